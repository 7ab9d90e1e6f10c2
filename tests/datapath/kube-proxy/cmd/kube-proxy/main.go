// Command kube-proxy is upstream's kube-proxy built from the same k8s.io/kubernetes version as
// the test control plane, so the data-path tests (tests/datapath) show that an unmodified
// kube-proxy turns the EndpointSlices our controllers write into working iptables and nftables
// rules.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-proxy/app"
)

func main() {
	os.Exit(cli.Run(app.NewProxyCommand()))
}

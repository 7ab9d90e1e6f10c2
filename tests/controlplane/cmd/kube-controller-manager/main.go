// Command kube-controller-manager is upstream's kube-controller-manager built from the same
// k8s.io/kubernetes version as the test control plane, so tests and benchmarks can run
// upstream's controllers (for example --controllers=endpointslice) beside ours as the reference.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}

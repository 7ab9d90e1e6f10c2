// Command coredns is CoreDNS with only the plugins the data-path tests use (errors, log and
// kubernetes), so the tests can show that CoreDNS answers Service names from the Services and
// EndpointSlices our controllers write. Fewer plugins keep the cold build short.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

// The plugin chain's order, as CoreDNS's generated directive list would give for these three.
func init() { dnsserver.Directives = []string{"errors", "log", "kubernetes"} }

func main() { coremain.Run() }

// Command helm is Helm itself, built from its Go module at the version pinned in ../../go.mod,
// so tests and the demo use a known helm without downloading a release binary.
//
// Helm v4 is used because it exports its root command (helm.sh/helm/v4/pkg/cmd); in v3 the
// command lives in package main and cannot be imported, so a thin wrapper needs v4. Charts
// with apiVersion v2 behave the same under both for lint and template.
package main

import (
	"errors"
	"os"

	// Client auth plugins (exec, oidc) for kubeconfigs that use them, as helm's own main does.
	_ "k8s.io/client-go/plugin/pkg/client/auth"

	helmcmd "helm.sh/helm/v4/pkg/cmd"
	"helm.sh/helm/v4/pkg/kube"
)

func main() {
	// The field manager name in server-side apply; keep helm's own so objects look the same.
	kube.ManagedFieldsManager = "helm"

	cmd, err := helmcmd.NewRootCmd(os.Stdout, os.Args[1:], helmcmd.SetupLogging)
	if err != nil {
		os.Stderr.WriteString("helm: " + err.Error() + "\n")
		os.Exit(1)
	}
	if err := cmd.Execute(); err != nil {
		var cerr helmcmd.CommandError
		if errors.As(err, &cerr) {
			os.Exit(cerr.ExitCode)
		}
		os.Exit(1)
	}
}

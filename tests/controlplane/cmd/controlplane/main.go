// Command controlplane starts a real etcd and a real kube-apiserver on loopback, the way
// controller-runtime's envtest does, for service-controller-manager's tests, benchmarks and demo.
//
// It embeds etcd (go.etcd.io/etcd/server/v3) and runs kube-apiserver in-process from the
// k8s.io/kubernetes module. It generates a CA, a serving certificate, an admin client
// certificate (group system:masters) and a service-account signing key, writes an admin
// kubeconfig, prints one line when /readyz answers, and on SIGTERM, SIGINT or (with
// --exit-on-stdin-close) end of standard input stops everything and removes its data directory.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		dataDir       = flag.String("data-dir", "", "directory for etcd data, certificates and the kubeconfig (default: a new temporary directory, removed on exit)")
		kubeconfigOut = flag.String("kubeconfig", "", "where to write the admin kubeconfig (default: <data-dir>/admin.kubeconfig)")
		serviceCIDR   = flag.String("service-cluster-ip-range", "10.96.0.0/16", "kube-apiserver --service-cluster-ip-range")
		nodePortRange = flag.String("service-node-port-range", "30000-32767", "kube-apiserver --service-node-port-range")
		securePort    = flag.Int("secure-port", 0, "kube-apiserver port on 127.0.0.1 (0: a free port)")
		exitOnStdin   = flag.Bool("exit-on-stdin-close", false, "shut down when standard input reaches end of file (so a test harness that dies takes the control plane with it)")
		pidFile       = flag.String("pid-file", "", "write this process's pid here")
		advertise     = flag.String("advertise-address", "192.0.2.10", "address kube-apiserver publishes in default/kubernetes (must not be loopback)")
		readyTimeout  = flag.Duration("ready-timeout", 3*time.Minute, "give up if /readyz does not answer ok within this time")
		extraArgs     stringList
	)
	flag.Var(&extraArgs, "apiserver-arg", "extra kube-apiserver flag, e.g. --apiserver-arg=--feature-gates=Foo=true (repeatable)")
	flag.Parse()

	ownDir := false
	if *dataDir == "" {
		d, err := os.MkdirTemp("", "scm-controlplane-")
		if err != nil {
			return err
		}
		*dataDir = d
		ownDir = true
	} else if err := os.MkdirAll(*dataDir, 0o700); err != nil {
		return err
	}
	cleanup := func() {
		if ownDir {
			_ = os.RemoveAll(*dataDir)
		} else {
			_ = os.RemoveAll(filepath.Join(*dataDir, "etcd"))
			_ = os.RemoveAll(filepath.Join(*dataDir, "pki"))
		}
		if *pidFile != "" {
			_ = os.Remove(*pidFile)
		}
	}
	defer cleanup()
	if *pidFile != "" {
		if err := os.WriteFile(*pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			return err
		}
	}
	if *kubeconfigOut == "" {
		*kubeconfigOut = filepath.Join(*dataDir, "admin.kubeconfig")
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		cancel()
		// A second signal means the caller is out of patience.
		<-sigs
		cleanup()
		os.Exit(1)
	}()
	if *exitOnStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			cancel()
		}()
	}

	pki, err := writePKI(filepath.Join(*dataDir, "pki"))
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}

	etcd, etcdURL, err := startEtcd(filepath.Join(*dataDir, "etcd"))
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		<-etcd.Server.StopNotify()
	}()

	port := *securePort
	if port == 0 {
		if port, err = freePort(); err != nil {
			return err
		}
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := writeKubeconfig(*kubeconfigOut, server, pki); err != nil {
		return err
	}

	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		// kube-apiserver refuses a loopback advertise address (it publishes it in the
		// default/kubernetes Endpoints). Nothing connects to it here, so a documentation
		// address (TEST-NET-1) stands in; clients use the loopback URL in the kubeconfig.
		"--advertise-address=" + *advertise,
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(*dataDir, "pki", "serving"),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caCert,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + pki.saPub,
		"--service-account-signing-key-file=" + pki.saKey,
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=" + *serviceCIDR,
		"--service-node-port-range=" + *nodePortRange,
		"--allow-privileged=true",
		// There is no kube-controller-manager creating each namespace's "default"
		// ServiceAccount, so pods would be refused by this admission plugin.
		"--disable-admission-plugins=ServiceAccount",
		"--max-requests-inflight=2000",
		"--max-mutating-requests-inflight=1000",
		"--v=0",
	}
	args = append(args, extraArgs...)

	errc := make(chan error, 1)
	go func() { errc <- runAPIServer(ctx, args) }()

	readyCtx, readyCancel := context.WithTimeout(ctx, *readyTimeout)
	defer readyCancel()
	if err := waitReady(readyCtx, server, pki, errc); err != nil {
		cancel()
		return err
	}
	fmt.Printf("controlplane ready: server=%s kubeconfig=%s pid=%d\n", server, *kubeconfigOut, os.Getpid())

	select {
	case <-ctx.Done():
		select {
		case <-errc:
		case <-time.After(8 * time.Second):
		}
		return nil
	case err := <-errc:
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			err = errors.New("kube-apiserver stopped")
		}
		return err
	}
}

// runAPIServer does what kube-apiserver's own command does, but with our context in place of
// its process-wide signal handler, so that end of stdin can stop it too.
func runAPIServer(ctx context.Context, args []string) error {
	s := options.NewServerRunOptions()
	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("kube-apiserver flags: %w", err)
	}
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		return err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return fmt.Errorf("kube-apiserver options: %v", errs)
	}
	featureGate.(featuregate.MutableFeatureGate).AddMetrics()
	return app.Run(ctx, completed)
}

type pkiPaths struct {
	caCert, servingCert, servingKey, adminCert, adminKey, saKey, saPub string
	caPEM, adminCertPEM, adminKeyPEM                                   []byte
}

func writePKI(dir string) (*pkiPaths, error) {
	if err := os.MkdirAll(filepath.Join(dir, "serving"), 0o700); err != nil {
		return nil, err
	}
	p := &pkiPaths{
		caCert:      filepath.Join(dir, "ca.crt"),
		servingCert: filepath.Join(dir, "serving.crt"),
		servingKey:  filepath.Join(dir, "serving.key"),
		adminCert:   filepath.Join(dir, "admin.crt"),
		adminKey:    filepath.Join(dir, "admin.key"),
		saKey:       filepath.Join(dir, "sa.key"),
		saPub:       filepath.Join(dir, "sa.pub"),
	}
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "service-controller-manager-test-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caParsed, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(p.caCert, p.caPEM, 0o600); err != nil {
		return nil, err
	}
	issue := func(serial int64, tmpl *x509.Certificate, certPath, keyPath string) ([]byte, []byte, error) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, nil, err
		}
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore = now
		tmpl.NotAfter = now.Add(10 * 365 * 24 * time.Hour)
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caParsed, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, err
		}
		certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
		if err := os.WriteFile(certPath, certPEM, 0o600); err != nil {
			return nil, nil, err
		}
		if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
			return nil, nil, err
		}
		return certPEM, keyPEM, nil
	}
	if _, _, err := issue(2, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}, p.servingCert, p.servingKey); err != nil {
		return nil, err
	}
	if p.adminCertPEM, p.adminKeyPEM, err = issue(3, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, p.adminCert, p.adminKey); err != nil {
		return nil, err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.saKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}), 0o600); err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.saPub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

func writeKubeconfig(path, server string, p *pkiPaths) error {
	enc := base64.StdEncoding.EncodeToString
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: local
  context:
    cluster: local
    user: admin
    namespace: default
current-context: local
`, server, enc(p.caPEM), enc(p.adminCertPEM), enc(p.adminKeyPEM))
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(cfg), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func startEtcd(dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.Name = "controlplane"
	clientURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = fmt.Sprintf("%s=%s", cfg.Name, peerURL.String())
	cfg.LogLevel = "error"
	// Test data is thrown away on exit, so durability buys nothing and fsync costs a lot.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", errors.New("etcd did not become ready within 60s")
	}
	return e, clientURL.String(), nil
}

func waitReady(ctx context.Context, server string, p *pkiPaths, errc <-chan error) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.caPEM)
	cert, err := tls.X509KeyPair(p.adminCertPEM, p.adminKeyPEM)
	if err != nil {
		return err
	}
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}},
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := client.Get(server + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.TrimSpace(string(body)) == "ok" {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kube-apiserver /readyz did not answer ok: %w", ctx.Err())
		case err := <-errc:
			return fmt.Errorf("kube-apiserver exited before ready: %v", err)
		case <-tick.C:
		}
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

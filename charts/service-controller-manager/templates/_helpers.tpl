{{/* Names, labels and the controller/RBAC tables shared by the templates. */}}

{{- define "scm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "scm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "scm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "scm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "scm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "scm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "scm.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Every controller the binary knows, in its start order (src/flags.rs CONTROLLERS).
*/}}
{{- define "scm.allControllers" -}}
clusterip-alloc,service-cidr,nodeport-alloc,endpointslice,endpointslice-mirroring,endpoints,cloud-lb
{{- end }}

{{/*
The controllers that will run, comma-separated: those switched on in .Values.controllers, with
cloud-lb only when a cloud provider is configured (as the binary's '*' treats it). The Deployment
passes exactly this list to --controllers, and the ClusterRole grants exactly these controllers'
rules, so the two cannot drift apart.
*/}}
{{- define "scm.enabledControllers" -}}
{{- $out := list }}
{{- range $name := splitList "," (include "scm.allControllers" .) }}
{{- if index $.Values.controllers $name }}
{{- if or (ne $name "cloud-lb") $.Values.cloudProvider.name }}
{{- $out = append $out $name }}
{{- end }}
{{- end }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/*
What each controller does to the API, as RBAC rules (group, resource, verbs). Based on upstream's
bootstrap roles (system:controller:endpointslice-controller, endpointslicemirroring-controller,
endpoint-controller, service-cidrs-controller, and the cloud-provider service-controller) and
narrowed or widened to what our controllers actually call:
- the allocators (clusterip-alloc, nodeport-alloc) read Services back after a conflict (get) and
  write a Service (update) only to assign a ClusterIP or NodePort the API server did not, which a
  stock API server never leaves undone: update is granted only with assign (--assign);
- nothing reads single pods, nodes or EndpointSlices (informers list and watch them), and
  ServiceCIDRs and their status are written with update, Service status with a merge patch
  (cloud-lb's status.loadBalancer) or a server-side apply (the conditions of endpointslice and
  cloud-lb, each under its own field manager; a conflict re-reads the Service with get);
- cloud-lb puts its finalizer on with a merge patch (services patch) and reads a Service back
  after a status conflict (get); with the local provider it also watches LoadBalancerIPPools and
  Namespaces (for namespaceSelector) and writes pool status (re-read with get on a conflict);
- services/finalizers and endpoints/finalizers update are what upstream grants so that slices
  may set blockOwnerDeletion in their owner references (OwnerReferencesPermissionEnforcement).
Events are one shared rule (see clusterrole.yaml); the Lease is a namespaced Role.
*/}}
{{- define "scm.controllerRules" -}}
clusterip-alloc:
  - {group: "", resource: services, verbs: [get, list, watch{{ if .Values.assign }}, update{{ end }}]}
  - {group: "", resource: services/status, verbs: [patch]}
  - {group: networking.k8s.io, resource: servicecidrs, verbs: [get, list, watch]}
  - {group: networking.k8s.io, resource: ipaddresses, verbs: [list, watch]}
service-cidr:
  - {group: networking.k8s.io, resource: servicecidrs, verbs: [get, list, watch, update]}
  - {group: networking.k8s.io, resource: servicecidrs/finalizers, verbs: [patch, update]}
  - {group: networking.k8s.io, resource: servicecidrs/status, verbs: [update]}
  - {group: networking.k8s.io, resource: ipaddresses, verbs: [get, list, watch]}
nodeport-alloc:
  - {group: "", resource: services, verbs: [get, list, watch{{ if .Values.assign }}, update{{ end }}]}
endpointslice:
  - {group: "", resource: services, verbs: [get, list, watch]}
  - {group: "", resource: services/status, verbs: [patch]}
  - {group: "", resource: pods, verbs: [list, watch]}
  - {group: "", resource: nodes, verbs: [list, watch]}
  - {group: "", resource: services/finalizers, verbs: [update]}
  - {group: discovery.k8s.io, resource: endpointslices, verbs: [list, watch, create, update, delete]}
endpointslice-mirroring:
  - {group: "", resource: services, verbs: [get, list, watch]}
  - {group: "", resource: endpoints, verbs: [get, list, watch]}
  - {group: "", resource: services/finalizers, verbs: [update]}
  - {group: "", resource: endpoints/finalizers, verbs: [update]}
  - {group: discovery.k8s.io, resource: endpointslices, verbs: [list, watch, create, update, delete]}
endpoints:
  - {group: "", resource: services, verbs: [get, list, watch]}
  - {group: "", resource: pods, verbs: [list, watch]}
  - {group: "", resource: endpoints, verbs: [get, list, watch, create, update, delete]}
  - {group: "", resource: endpoints/restricted, verbs: [create]}
cloud-lb:
  - {group: "", resource: services, verbs: [get, list, watch, patch]}
  - {group: "", resource: services/status, verbs: [patch]}
  - {group: "", resource: nodes, verbs: [list, watch]}
{{- if .Values.cloudProvider.endpointAwareTargets }}
  - {group: discovery.k8s.io, resource: endpointslices, verbs: [list, watch]}
{{- end }}
{{- if eq .Values.cloudProvider.name "local" }}
  - {group: "", resource: namespaces, verbs: [list, watch]}
  - {group: service-controller-manager.io, resource: loadbalancerippools, verbs: [get, list, watch]}
  - {group: service-controller-manager.io, resource: loadbalancerippools/status, verbs: [get, update]}
{{- end }}
{{- end }}

{{/* Canonical verb order, so rendered rules read the same way as upstream's. */}}
{{- define "scm.verbOrder" -}}
get,list,watch,create,update,patch,delete
{{- end }}

{{/* The port of --http-address (after its last ':'), when set. */}}
{{- define "scm.httpPort" -}}
{{- with .Values.httpAddress }}{{ regexFind "[0-9]+$" . }}{{ end }}
{{- end }}

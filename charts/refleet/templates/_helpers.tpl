{{/* Name of the operator's ServiceAccount. */}}
{{- define "refleet.serviceAccountName" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "refleet.commonLabels" -}}
app.kubernetes.io/name: refleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of the operator and its objects. */}}
{{- define "refleet.labels" -}}
{{ include "refleet.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* What selects the operator's pods (Deployment, PodDisruptionBudget, Services). */}}
{{- define "refleet.selectorLabels" -}}
app.kubernetes.io/name: refleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator's image. */}}
{{- define "refleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Secret with the join-token signing key (the operator creates it when missing). */}}
{{- define "refleet.joinTokenSecret" -}}
{{- default (printf "%s-join-token" .Release.Name) .Values.joinTokens.existingSecret -}}
{{- end -}}

{{/* Secret with the report key (key `token`; the operator creates it when missing). */}}
{{- define "refleet.reportSecret" -}}
{{- default (printf "%s-report-key" .Release.Name) .Values.report.existingSecret -}}
{{- end -}}

{{/* Secret with the API keys (file name = appId, content = key). */}}
{{- define "refleet.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" .Release.Name) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* TLS Secret of the router (existing, or written by cert-manager). */}}
{{- define "refleet.routerTLSSecret" -}}
{{- default (printf "%s-router-tls" .Release.Name) .Values.router.tls.existingSecret -}}
{{- end -}}

{{/* TLS Secret of the reflector endpoints (existing, or written by cert-manager). */}}
{{- define "refleet.reflectorTLSSecret" -}}
{{- default (printf "%s-reflector-tls" .Release.Name) .Values.reflectorTLS.existingSecret -}}
{{- end -}}

{{/* The report Service's URL, which the operator gives the reflector pods it creates. */}}
{{- define "refleet.reportURL" -}}
{{- printf "http://%s-report.%s.svc:8081" .Release.Name .Release.Namespace -}}
{{- end -}}

{{/* The Lease used for leader election. */}}
{{- define "refleet.leaseName" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.operator.leaseName -}}
{{- end -}}

{{/*
Checks that no schema can express (values.schema.json catches the rest), each failing with
a message that names the value to change.
*/}}
{{- define "refleet.validate" -}}
{{- if and .Values.rbac.namespaced (empty .Values.operator.watchNamespaces) -}}
{{- fail "rbac.namespaced=true needs operator.watchNamespaces: the namespaces that get a Role and RoleBinding (and that the operator watches)" -}}
{{- end -}}
{{- if and .Values.router.tls.enabled (not .Values.router.tls.existingSecret) (not .Values.router.tls.certManager.enabled) -}}
{{- fail "router.tls.enabled=true needs router.tls.existingSecret (a kubernetes.io/tls Secret) or router.tls.certManager.enabled=true" -}}
{{- end -}}
{{- if and .Values.router.tls.enabled .Values.router.tls.certManager.enabled (empty (include "refleet.routerDNSNames" . | fromYamlArray)) -}}
{{- fail "router.tls.certManager needs DNS names: set router.tls.certManager.dnsNames or router.ingress.host" -}}
{{- end -}}
{{- if and .Values.router.tls.enabled .Values.router.ingress.enabled (not .Values.router.ingress.host) -}}
{{- fail "router.tls.enabled with router.ingress.enabled needs router.ingress.host (TLS is per host)" -}}
{{- end -}}
{{- if and .Values.reflectorTLS.enabled (not .Values.reflectorTLS.existingSecret) (not .Values.reflectorTLS.certManager.enabled) -}}
{{- fail "reflectorTLS.enabled=true needs reflectorTLS.existingSecret or reflectorTLS.certManager.enabled=true" -}}
{{- end -}}
{{- if and .Values.reflectorTLS.enabled .Values.reflectorTLS.certManager.enabled (empty .Values.reflectorTLS.certManager.dnsNames) -}}
{{- fail "reflectorTLS.certManager.enabled=true needs reflectorTLS.certManager.dnsNames (the reflector endpoints' host names)" -}}
{{- end -}}
{{- if and .Values.router.gateway.enabled (empty .Values.router.gateway.parentRefs) -}}
{{- fail "router.gateway.enabled=true needs router.gateway.parentRefs (the Gateway the routes attach to)" -}}
{{- end -}}
{{- if and .Values.gateways.enabled (empty .Values.gateways.regions) -}}
{{- fail "gateways.enabled=true needs gateways.regions: the regions to run a gateway in, as [{name: eu-west}]" -}}
{{- end -}}
{{- if and .Values.gateways.enabled (not .Values.joinTokens.enabled) -}}
{{- fail "gateways.enabled=true needs joinTokens.enabled=true: a gateway reads the shard from the join token" -}}
{{- end -}}
{{- end -}}

{{/* DNS names of the router's certificate: the explicit list, else the Ingress host. */}}
{{- define "refleet.routerDNSNames" -}}
{{- $names := .Values.router.tls.certManager.dnsNames -}}
{{- if and (empty $names) .Values.router.ingress.host -}}
{{- $names = list .Values.router.ingress.host -}}
{{- end -}}
{{- toYaml $names -}}
{{- end -}}

{{/* What selects one region's gateway pods (dict: root, region). */}}
{{- define "refleet.gatewaySelectorLabels" -}}
app.kubernetes.io/name: refleet
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: gateway
refleet.dev/region: {{ .region | quote }}
{{- end -}}

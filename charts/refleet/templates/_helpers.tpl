{{/* Name of the operator's ServiceAccount. */}}
{{- define "refleet.serviceAccountName" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Common labels. */}}
{{- define "refleet.labels" -}}
app.kubernetes.io/name: refleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

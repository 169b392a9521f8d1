{{- define "difftrain.name" -}}difftrain-operator{{- end -}}
{{- define "difftrain.labels" -}}
app.kubernetes.io/name: difftrain
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "difftrain.selector" -}}
app.kubernetes.io/name: difftrain
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Names, labels and shared snippets. */}}

{{- define "pageant.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release-scoped base name: "<release>-pageant", or the release name when it already contains the chart name. */}}
{{- define "pageant.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pageant.operator.fullname" -}}
{{- printf "%s-operator" (include "pageant.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pageant.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "pageant.labels" -}}
helm.sh/chart: {{ include "pageant.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pageant
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of the operator's pods (immutable: never add to these). */}}
{{- define "pageant.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pageant.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "pageant.operator.labels" -}}
{{ include "pageant.labels" . }}
app.kubernetes.io/name: {{ include "pageant.name" . }}-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "pageant.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pageant.operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pageant.operator.image" -}}
{{- include "pageant.image" (dict "image" .Values.operator.image "root" .) -}}
{{- end -}}

{{- define "pageant.engine.image" -}}
{{- include "pageant.image" (dict "image" .Values.engine.image "root" .) -}}
{{- end -}}

{{/* repository@digest, or repository:tag (tag defaults to the appVersion). */}}
{{- define "pageant.image" -}}
{{- $img := .image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The operator's PolicyRules (files/rbac/operator-rules.yaml, synced from pageant.operator.rbac.RULES),
split by scope. "pageant.rules.namespaced": rules on namespaced resources. "pageant.rules.cluster":
rules on cluster-scoped resources (watching CRDs), needed only when the operator watches all
namespaces: with --namespace it disables kopf's cluster-wide scanning. Each renders a YAML list.
*/}}
{{- define "pageant.rules.all" -}}
{{- .Files.Get "files/rbac/operator-rules.yaml" -}}
{{- end -}}

{{- define "pageant.rules.clusterScopedResources" -}}
customresourcedefinitions namespaces
{{- end -}}

{{- define "pageant.rules.namespaced" -}}
{{- $clusterScoped := splitList " " (include "pageant.rules.clusterScopedResources" .) -}}
{{- $out := list -}}
{{- range (include "pageant.rules.all" . | fromYamlArray) -}}
{{- $cluster := false -}}
{{- range .resources -}}{{- if has . $clusterScoped -}}{{- $cluster = true -}}{{- end -}}{{- end -}}
{{- if not $cluster -}}{{- $out = append $out . -}}{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "pageant.rules.cluster" -}}
{{- $clusterScoped := splitList " " (include "pageant.rules.clusterScopedResources" .) -}}
{{- $allNamespaces := empty .Values.operator.watchNamespaces -}}
{{- $out := list -}}
{{- range (include "pageant.rules.all" . | fromYamlArray) -}}
{{- $cluster := false -}}
{{- range .resources -}}{{- if has . $clusterScoped -}}{{- $cluster = true -}}{{- end -}}{{- end -}}
{{- if and $cluster $allNamespaces -}}{{- $out = append $out . -}}{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Namespace for an optional object: its own override, else the release namespace. */}}
{{- define "pageant.namespace" -}}
{{- default .root.Release.Namespace .override -}}
{{- end -}}

{{/* The ClusterRole's rules: everything in all-namespaces mode, else only the cluster-scoped rules. */}}
{{- define "pageant.rules.clusterRole" -}}
{{- $rules := include "pageant.rules.cluster" . | fromYamlArray -}}
{{- if empty .Values.operator.watchNamespaces -}}
{{- $rules = concat (include "pageant.rules.namespaced" . | fromYamlArray) $rules -}}
{{- end -}}
{{- toYaml $rules -}}
{{- end -}}

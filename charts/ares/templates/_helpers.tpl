{{/* Chart name, cut to fit a DNS label. */}}
{{- define "ares.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix for resource names: RELEASE-ares, or the release name if it already says ares. */}}
{{- define "ares.fullname" -}}
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

{{- define "ares.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ares.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "ares.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ares.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ares
{{- end }}

{{- define "ares.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ares.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. Call with (list repo tag .) */}}
{{- define "ares.image" -}}
{{- $repo := index . 0 }}{{- $tag := index . 1 }}{{- $root := index . 2 }}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $tag) }}
{{- end }}

{{/*
What the operator does in the namespaces it watches. Kept in one place so the
cluster-wide and per-namespace variants cannot drift apart.
*/}}
{{- define "ares.namespacedRules" -}}
# The AresTrainingJobs: kopf watches them, patches finalizers and its progress
# annotations, writes status; the operator deletes finished jobs (ttlSecondsAfterFinished).
- apiGroups: ["ares.io"]
  resources: ["aresjobs"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
- apiGroups: ["ares.io"]
  resources: ["aresjobs/status"]
  verbs: ["get", "patch", "update"]
# Children carry blockOwnerDeletion: clusters that enforce owner-reference permissions
# (the OwnerReferencesPermissionEnforcement admission plugin) require this.
- apiGroups: ["ares.io"]
  resources: ["aresjobs/finalizers"]
  verbs: ["update"]
# Server and device pods: created, annotated (split point, power mode, bandwidth),
# and deleted to restart one failed device.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The server's Service, device tokens (Secrets) and configs (ConfigMaps): created
# once and garbage-collected with the job through owner references; deleted by name
# when a job cannot be created after all, or is stopped. (Never listed: a list of
# Secrets would hand over every token of the namespace.)
- apiGroups: [""]
  resources: ["services", "configmaps", "secrets"]
  verbs: ["get", "create", "delete"]
# A job's requests are checked against the namespace's quotas before anything is created.
- apiGroups: [""]
  resources: ["resourcequotas"]
  verbs: ["get", "list"]
# kopf posts handler progress and errors as events.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Names and labels, prefixed with the chart name so they never clash. */}}
{{- define "poolbudget-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name. A release named after the chart, or after some of its
dash-separated words ("poolbudget", "operator"), gives the chart's name alone
(`helm install poolbudget ...` -> poolbudget-operator, not poolbudget-poolbudget-operator);
a release whose name already contains the chart's name is used as it is; any other release
name is prefixed to it.
*/}}
{{- define "poolbudget-operator.fullname" -}}
{{- $name := include "poolbudget-operator.name" . }}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if contains (printf "-%s-" .Release.Name) (printf "-%s-" $name) }}
{{- $name }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "poolbudget-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "poolbudget-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object. Rendered for `kubectl apply` (plainManifests, see
hack/render-install-manifest.sh) they say so: no helm.sh/chart, managed-by kubectl.
*/}}
{{- define "poolbudget-operator.labels" -}}
{{- if not .Values.plainManifests -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ end -}}
{{ include "poolbudget-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ if .Values.plainManifests }}kubectl{{ else }}{{ .Release.Service }}{{ end }}
{{- end }}

{{- define "poolbudget-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "poolbudget-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "poolbudget-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
What the operator does in a watched namespace, and nothing more (the chart README says why
for each line). Shared by the ClusterRole (cluster-wide) and the per-namespace Roles.
*/}}
{{- define "poolbudget-operator.namespacedRules" -}}
# No `get` on what is only watched: the operator's informers and Kopf list and watch, and
# write with patch. ConfigMaps are watched by label (only the managed ones are kept; RBAC
# cannot narrow `list` to a label) and read by name when not in that cache. PoolBudgets are read by name once, to tell whether the budget named on
# a managed ConfigMap still exists (if not, the ConfigMap is adopted).
- apiGroups: [poolbudget.dev]
  resources: [poolbudgets]
  verbs: [get, list, watch, patch]
- apiGroups: [poolbudget.dev]
  resources: [poolbudgets/status]
  verbs: [patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/*
The admission guard's CEL, shared by its two policies (templates/admission-guard.yaml).
`variables.deployment` names the target; the operator's numbers for it are the keys
`<deployment>.<field>` of the params ConfigMap (operator/poolbudget/domain/admission.py
writes them; AdmissionLimit.pods_at is what `pods` mirrors, a cluster test holds them to
the same numbers). The policy defines `proposed`, `current` and `desired` in between.
*/}}
{{- define "poolbudget-operator.admissionParams" -}}
- name: params
  expression: "has(params.data) ? params.data : {}"
- name: prefix
  expression: "variables.deployment + '.'"
- name: budgeted
  expression: "variables.deployment != '' && (variables.prefix + 'maxReplicas') in variables.params"
- name: maxReplicas
  expression: "int(variables.params[variables.prefix + 'maxReplicas'])"
{{- end }}

{{- define "poolbudget-operator.admissionNeed" -}}
# Pods at `desired` replicas, as the budget counts them: maxSurge rounded up,
# maxUnavailable down (at least 1 when both are 0), one rollout step of terminating
# pods when Counted, at least one pod.
- name: surge
  expression: "int(variables.params[variables.prefix + 'maxSurge']) + (variables.desired * int(variables.params[variables.prefix + 'maxSurgePercent']) + 99) / 100"
- name: unavailableAsGiven
  expression: "int(variables.params[variables.prefix + 'maxUnavailable']) + variables.desired * int(variables.params[variables.prefix + 'maxUnavailablePercent']) / 100"
- name: unavailable
  expression: "variables.surge == 0 && variables.unavailableAsGiven == 0 ? 1 : variables.unavailableAsGiven"
- name: terminating
  expression: >-
    variables.params[variables.prefix + 'terminatingPods'] != 'Counted' ? 0
    : (variables.surge + variables.unavailable < variables.desired ? variables.surge + variables.unavailable : variables.desired)
- name: podsAsCounted
  expression: >-
    variables.params[variables.prefix + 'strategy'] == 'Recreate' ? variables.desired
    : variables.desired + variables.surge + variables.terminating
- name: pods
  expression: "variables.podsAsCounted > 1 ? variables.podsAsCounted : 1"
- name: need
  expression: "int(variables.params[variables.prefix + 'othersMinimum']) + int(variables.params[variables.prefix + 'connectionsPerPod']) * variables.pods"
- name: verdict
  expression: >-
    ' needs at least ' + string(variables.need) + ' connections (minimum pools), '
    + variables.params[variables.prefix + 'usable'] + ' usable; '
    + (variables.maxReplicas < 0 ? 'not even one pod fits' : 'at most ' + string(variables.maxReplicas) + ' replicas fit')
    + ' (limits computed ' + variables.params[variables.prefix + 'computedAt']
    + ' for generation ' + variables.params[variables.prefix + 'generation'] + ')'
{{- end }}

{{- define "mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mesh.fullname" -}}
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

{{- define "mesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: connector-mesh
{{- end -}}

{{- define "mesh.selector" -}}
app.kubernetes.io/name: {{ include "mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pod and container security: non-root, read-only root, no capabilities, RuntimeDefault seccomp. */}}
{{- define "mesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "mesh.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Files of `meshctl security init` DIR the control plane reads: Secret key -> path under the mount. */}}
{{- define "mesh.securityItems" -}}
- {key: security.json, path: security.json}
- {key: operator.jwt, path: operator.jwt}
- {key: nats-auth.conf, path: nats-auth.conf}
- {key: accounts.MESH.jwt, path: accounts/MESH.jwt}
- {key: accounts.SYS.jwt, path: accounts/SYS.jwt}
- {key: keys.mesh-account.nk, path: keys/mesh-account.nk}
- {key: keys.mesh-account-signing.nk, path: keys/mesh-account-signing.nk}
- {key: keys.sys-account.nk, path: keys/sys-account.nk}
- {key: keys.operator-signing.nk, path: keys/operator-signing.nk}
- {key: creds.control-plane.creds, path: creds/control-plane.creds}
- {key: creds.sys.creds, path: creds/sys.creds}
{{- end -}}

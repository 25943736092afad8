"""Every name the operator shares with the cluster, the pods and the runtime, in one place."""

from __future__ import annotations

# --- The custom resource -------------------------------------------------------------------
GROUP = "ares.io"
VERSION = "v1alpha1"
PLURAL = "aresjobs"
KIND = "AresTrainingJob"
API_VERSION = f"{GROUP}/{VERSION}"

# --- Labels on every child (select a job's objects; tell server and devices apart) ----------
LABEL_JOB = "ares.io/job"                # the AresTrainingJob's name
LABEL_ROLE = "ares.io/role"              # ROLE_SERVER or ROLE_DEVICE
LABEL_DEVICE = "ares.io/device"          # device name (device pods only)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "ares-operator"
ROLE_SERVER = "server"
ROLE_DEVICE = "device"

# --- Annotations on device pods, projected into the pod by a downwardAPI volume --------------
ANNOTATION_SPLIT = "ares.io/split-point"      # the device's split point; re-read every round
ANNOTATION_POWER_MODE = "ares.io/power-mode"  # Jetson nvpmodel mode the sidecar applies
ANNOTATION_BANDWIDTH = "ares.io/bandwidth"    # uplink cap the sidecar applies with tc ("" = none)
HOST_CONTROL_ANNOTATIONS = (ANNOTATION_SPLIT, ANNOTATION_POWER_MODE, ANNOTATION_BANDWIDTH)
# Which replacement of the device's pod this is (0 = the first); informational.
ANNOTATION_ATTEMPT = "ares.io/attempt"

# kopf keeps its own bookkeeping (handler progress, last-handled spec) under this prefix.
KOPF_PREFIX = "operator.ares.io"
FINALIZER = "operator.ares.io/finalizer"

# --- Device classes and power modes ----------------------------------------------------------
JETSON_CLASSES = frozenset({"jetson-nano", "jetson-orin"})
DEVICE_CLASSES = ("jetson-nano", "jetson-orin", "raspberry-pi", "cpu")
POWER_MODES = ("MAXN", "5W", "custom1", "custom3")
JETSON_RUNTIME_CLASS = "nvidia"  # runtimeClassName for Jetson pods (NVIDIA container runtime)
# Board power on a Jetson Nano (INA3221 monitor), read by the sidecar.
JETSON_POWER_PATH = "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input"
NVPMODEL_CONF = "/etc/nvpmodel.conf"
NVPMODEL_BIN = "/usr/sbin/nvpmodel"             # the host's tool, mounted into the Jetson sidecar
NVPMODEL_STATE_DIR = "/var/lib/nvpmodel"        # where nvpmodel records the mode in force

# --- Paths inside the pods ----------------------------------------------------------------
SERVER_CONFIG_DIR = "/etc/ares"                  # ConfigMap with server.yaml
SERVER_CONFIG_KEY = "server.yaml"
TOKENS_DIR = "/var/run/ares/tokens"              # server: every device token + controller token
DEVICE_TOKEN_DIR = "/var/run/ares/token"         # device: its own token only, as file `token`
TLS_DIR = "/var/run/ares/tls"                    # server: tls.crt and tls.key of the job's TLS Secret
CA_DIR = "/var/run/ares/ca"                      # device: ca.crt only (it verifies the server)
TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY = "ca.crt", "tls.crt", "tls.key"  # keys of the TLS Secret
TLS_FILE_MODE = 0o440                            # readable by the pod's group (fsGroup), nobody else
CLUSTER_DOMAIN = "cluster.local"                 # the last of the Service names the server cert carries
PODINFO_DIR = "/etc/podinfo"                     # downwardAPI: split-point, annotations
PODINFO_SPLIT = "split-point"
PODINFO_ANNOTATIONS = "annotations"
STATE_DIR = "/var/run/ares/state"                # emptyDir shared by device and sidecar
POWER_FILE = "power.json"                        # written by the sidecar in STATE_DIR
DATA_DIR = "/data"                               # data set (hostPath) in every pod
CHECKPOINT_DIR = "/var/lib/ares/checkpoints"     # server checkpoints (PVC or hostPath)
CHECKPOINT_HOST_ROOT = "/var/lib/ares/checkpoints"  # hostPath root: <root>/<namespace>/<job>
SERVER_PORT = 43000                              # the published prototype's port
SERVER_PORT_NAME = "http"
NETWORK_INTERFACE = "eth0"                       # the pod interface the sidecar shapes

# --- Container names -----------------------------------------------------------------------
CONTAINER_SERVER = "server"
CONTAINER_DEVICE = "device"
CONTAINER_SIDECAR = "host-control"

# --- Environment of the operator (see settings.py) -----------------------------------------
ENV_SERVER_IMAGE = "ARES_SERVER_IMAGE"
ENV_DEVICE_IMAGE = "ARES_DEVICE_IMAGE"
ENV_DEVICE_JETSON_IMAGE = "ARES_DEVICE_JETSON_IMAGE"
ENV_LOG_LEVEL = "ARES_LOG_LEVEL"
ENV_SERVER_URL_TEMPLATE = "ARES_SERVER_URL_TEMPLATE"  # how the operator reaches a job's server
ENV_TICK_SECONDS = "ARES_TICK_SECONDS"                # reconcile timer interval
ENV_HTTP_TIMEOUT = "ARES_HTTP_TIMEOUT_SECONDS"         # per request to a job's server

# --- Status: phases, condition types and reasons --------------------------------------------
PHASE_PENDING = "Pending"      # children being created, server not serving yet
PHASE_RUNNING = "Running"      # the server reports training
PHASE_SUCCEEDED = "Succeeded"  # the server reported its last round
PHASE_FAILED = "Failed"        # see the Failed condition's reason
TERMINAL_PHASES = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

COND_SPEC_VALID = "SpecValid"    # False: the spec has an error no schema could catch
COND_CREATED = "ChildrenCreated" # Secret, ConfigMap, Service, server and device pods exist
COND_SERVER_READY = "ServerReady"  # the operator can read the server's status
COND_DEVICES_READY = "DevicesReady"  # every device pod is running
COND_SPLITS_APPLIED = "SplitsApplied"  # the optimiser's last plan is on the pods
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"

REASON_VALID = "Valid"
REASON_INVALID_SPEC = "InvalidSpec"              # message lists every problem
REASON_CREATED = "Created"
REASON_SERVER_STARTING = "ServerStarting"
REASON_SERVER_SERVING = "Serving"
REASON_SERVER_UNREACHABLE = "ServerUnreachable"
REASON_SERVER_REPLACED = "ServerReplaced"         # a failed server pod was replaced
REASON_SERVER_FAILED = "ServerBackoffLimitExceeded"
REASON_SERVER_REPORTED_FAILURE = "TrainingFailed"  # the server's own phase is failed
REASON_DEVICES_RUNNING = "AllRunning"
REASON_DEVICES_WAITING = "DevicesNotRunning"
REASON_DEVICE_REPLACED = "DevicePodReplaced"
REASON_DEVICE_GAVE_UP = "DeviceBackoffLimitExceeded"
REASON_ALL_DEVICES_LOST = "AllDevicesFailed"
REASON_PLAN_APPLIED = "PlanApplied"
REASON_PLAN_PENDING = "AwaitingMeasurements"
REASON_COMPLETED = "Completed"

# --- Models the operator knows, by layer count (split points are 0..layers-1) ---------------
# The operator image carries no torch, so it cannot build a model to count its layers; a unit
# test checks this table against ares.core.models, so it cannot drift.
MODEL_LAYERS = {"vgg5": 7, "resnet18": 6}

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
LABEL_SHARD = "ares.io/shard"            # shard index (shard pods and Services only)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "ares-operator"
# The recommended app.kubernetes.io labels (kubectl, dashboards and cost tools group by them).
LABEL_APP_NAME = "app.kubernetes.io/name"            # always APP_NAME
LABEL_APP_INSTANCE = "app.kubernetes.io/instance"    # the job's name
LABEL_APP_COMPONENT = "app.kubernetes.io/component"  # ROLE_SERVER or ROLE_DEVICE
LABEL_APP_PART_OF = "app.kubernetes.io/part-of"      # always APP_NAME
APP_NAME = "ares"
ROLE_SERVER = "server"
ROLE_DEVICE = "device"
ROLE_SHARD = "shard"                     # a job with spec.server.shards > 1: one pod and Service a shard

# --- Annotations on device pods, projected into the pod by a downwardAPI volume --------------
ANNOTATION_SPLIT = "ares.io/split-point"      # the device's split point; re-read every round
ANNOTATION_POWER_MODE = "ares.io/power-mode"  # Jetson nvpmodel mode the sidecar applies
ANNOTATION_BANDWIDTH = "ares.io/bandwidth"    # uplink cap the sidecar applies with tc ("" = none)
HOST_CONTROL_ANNOTATIONS = (ANNOTATION_SPLIT, ANNOTATION_POWER_MODE, ANNOTATION_BANDWIDTH)
# The (codec, micro-batches) the controller chose for the device, as JSON (`StepOptions`), e.g.
# {"codec":"int8","micro_batches":4}; only on the pods of a job with a training.offer.
ANNOTATION_STEP_OPTIONS = "ares.io/step-options"
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
JETSON_VIDEO_GID = 44            # L4T's `video` group: owns the GPU device nodes; the trainer joins it
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
SHARD_TOKEN_KEY = "shard.token"                  # key of the token Secret: shards to their root (ares.runtime.shardproto)
TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY = "ca.crt", "tls.crt", "tls.key"  # keys of the TLS Secret
TLS_FILE_MODE = 0o440                            # readable by the pod's group (fsGroup), nobody else
CLUSTER_DOMAIN = "cluster.local"                 # the last of the Service names the server cert carries
PODINFO_DIR = "/etc/podinfo"                     # downwardAPI: split-point, annotations
PODINFO_SPLIT = "split-point"
PODINFO_OPTIONS = "split-point.options"          # beside the split file (ares.runtime.splitfile.options_path)
PODINFO_ANNOTATIONS = "annotations"
STATE_DIR = "/var/run/ares/state"                # emptyDir shared by device and sidecar
POWER_FILE = "power.json"                        # written by the sidecar in STATE_DIR
HOSTCTL_FILE = "hostctl.json"                    # the sidecar's report in STATE_DIR: the power mode in force
TRAINER_STATE_DIR = "/var/run/ares/trainer"      # emptyDir the trainer writes and the sidecar only reads
TRAINER_FILE = "trainer.json"                    # in it: whether a round is under way (modes switch between rounds)
DATA_DIR = "/data"                               # data set (hostPath) in every pod
CHECKPOINT_DIR = "/var/lib/ares/checkpoints"     # server checkpoints (PVC or hostPath)
CHECKPOINT_HOST_ROOT = "/var/lib/ares/checkpoints"  # hostPath root: <root>/<namespace>/<job>
SERVER_PORT = 43000                              # the published prototype's port
SERVER_PORT_NAME = "http"
NETWORK_INTERFACE = "eth0"                       # the pod interface the sidecar shapes

# --- Container names -----------------------------------------------------------------------
CONTAINER_SERVER = "server"
CONTAINER_DEVICE = "device"
CONTAINER_SIDECAR = "host-control"               # a native sidecar (init container, restartPolicy Always)
CONTAINER_PREPARE = "prepare-checkpoints"        # server init step: the checkpoint dir owned by APP_UID

# --- Pod security (restricted-minded: every container but the host-control sidecar) ----------
APP_UID = 10001                                  # the images' user; trainer and server run as it
APP_GID = 10001                                  # its group, also the pods' fsGroup
TOKEN_FILE_MODE = 0o440                          # token files: readable through the fsGroup only

# --- Environment of the operator (see settings.py) -----------------------------------------
ENV_SERVER_IMAGE = "ARES_SERVER_IMAGE"
ENV_DEVICE_IMAGE = "ARES_DEVICE_IMAGE"
ENV_DEVICE_JETSON_IMAGE = "ARES_DEVICE_JETSON_IMAGE"
ENV_LOG_LEVEL = "ARES_LOG_LEVEL"
ENV_SERVER_URL_TEMPLATE = "ARES_SERVER_URL_TEMPLATE"  # how the operator reaches a job's server
ENV_TICK_SECONDS = "ARES_TICK_SECONDS"                # reconcile timer interval
ENV_HTTP_TIMEOUT = "ARES_HTTP_TIMEOUT_SECONDS"         # per request to a job's server
ENV_METRICS_PORT = "ARES_METRICS_PORT"                # the operator's own /metrics (0 = off)
ENV_METRICS_ADDRESS = "ARES_METRICS_ADDRESS"          # address it listens on
ENV_WATCH_NAMESPACES = "ARES_WATCH_NAMESPACES"        # the namespaces kopf watches, comma-separated ("" = all)
ENV_ALLOWED_IMAGES = "ARES_ALLOWED_IMAGES"            # jobPolicy.allowedImages, comma-separated
ENV_ALLOWED_HOST_PATHS = "ARES_ALLOWED_HOST_PATHS"    # jobPolicy.allowedHostPaths, comma-separated
# Where a job's dataset.path may point unless the administrator allows more: beside, never
# under, the checkpoint root (other jobs' checkpoints live there).
DEFAULT_ALLOWED_HOST_PATH = "/var/lib/ares/datasets"

# --- Status: phases, condition types and reasons --------------------------------------------
PHASE_PENDING = "Pending"      # children being created, server not serving yet
PHASE_RUNNING = "Running"      # the server reports training
PHASE_SUCCEEDED = "Succeeded"  # the server reported its last round
PHASE_FAILED = "Failed"        # see the Failed condition's reason
PHASE_SUSPENDED = "Suspended"  # runPolicy.suspend: no pods; resumes from the checkpoint
TERMINAL_PHASES = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

COND_SPEC_VALID = "SpecValid"    # False: the spec has an error no schema could catch
COND_CREATED = "ChildrenCreated" # Secret, ConfigMap, Service, server and device pods exist
COND_SERVER_READY = "ServerReady"  # the operator can read the server's status
COND_DEVICES_READY = "DevicesReady"  # every device pod is running
COND_SPLITS_APPLIED = "SplitsApplied"  # the optimiser's last plan is on the pods
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_SUSPENDED = "Suspended"     # True while runPolicy.suspend holds the job's pods away
COND_RECONCILED = "Reconciled"   # False: the operator's last reconcile failed (reason, message)

REASON_VALID = "Valid"
REASON_INVALID_SPEC = "InvalidSpec"              # message lists every problem
REASON_NOT_ALLOWED = "NotAllowedByPolicy"        # an image or host path the administrator does not allow
REASON_CREATED = "Created"
REASON_SERVER_STARTING = "ServerStarting"
REASON_SERVER_SERVING = "Serving"
REASON_SERVER_UNREACHABLE = "ServerUnreachable"  # its pod runs, its status fails for a while
SERVER_UNREACHABLE_AFTER_S = 60.0  # longer than a server takes to load torch and its data
EVENT_COMPONENT = "ares-operator"                  # source.component of the operator's Events
REASON_JOB_FINISHED = "JobFinished"              # Ready conditions of an ended job
REASON_PODS_REPLACED = "PodReplaced"              # event: a failed pod was replaced (or removed)
REASON_POD_SECURITY = "PodSecurityForbidden"      # the namespace's Pod Security level refuses device pods
REASON_FORBIDDEN = "Forbidden"                    # RBAC refused one of the operator's calls
REASON_REFUSED = "Refused"                        # any other refusal of the API server
REASON_RUNTIME_CLASS = "RuntimeClassNotFound"     # a Jetson pod's RuntimeClass does not exist
REASON_QUOTA = "QuotaExceeded"                    # a ResourceQuota cannot hold the job
REASON_LIMIT_RANGE = "LimitRangeExceeded"         # a LimitRange refuses a container's resources
REASON_INVALID_CHILD = "InvalidChild"             # the API server found a child object invalid (422)
REASON_RECONCILED = "Reconciled"                  # Reconciled=True: the last reconcile completed
REASON_RECONCILE_ERROR = "ReconcileError"         # an unexpected error; retried with backoff
REASON_NOT_WATCHED = "NamespaceNotWatched"        # the operator no longer handles the job's namespace
REASON_OPERATOR_REMOVED = "OperatorUninstalled"   # the operator was uninstalled while the job ran
REASON_NAME_CONFLICT = "NameConflict"             # a child's name is held by another owner's object
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
REASON_TRAINING_DIVERGED = "TrainingDiverged"    # the server saw a non-finite loss
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"    # runPolicy.activeDeadlineSeconds passed
REASON_SUSPENDED = "JobSuspended"
REASON_RESUMED = "JobResumed"
REASON_DEVICE_EXITED = "TrainerExited"           # the trainer container ended (exit code in the message)

# A container the kubelet cannot start or keep running: its waiting reason (kubectl get pods shows
# it, e.g. Init:ImagePullBackOff) becomes the reason of ServerReady or DevicesReady, with the pod,
# the container and the kubelet's message, and a Warning Event when it first appears.
REASON_IMAGE_PULL_FAILED = "ImagePullFailed"           # the node cannot pull (or may not use) the image
REASON_CONTAINER_CREATE_FAILED = "ContainerCreateFailed"  # the runtime cannot create or start the container
REASON_CONTAINER_CRASH_LOOP = "ContainerCrashLooping"  # a restarted container (the sidecar) keeps failing
WAITING_REASONS = {
    "ErrImagePull": REASON_IMAGE_PULL_FAILED,
    "ImagePullBackOff": REASON_IMAGE_PULL_FAILED,
    "InvalidImageName": REASON_IMAGE_PULL_FAILED,
    "ErrImageNeverPull": REASON_IMAGE_PULL_FAILED,
    "ImageInspectError": REASON_IMAGE_PULL_FAILED,
    "CreateContainerConfigError": REASON_CONTAINER_CREATE_FAILED,
    "CreateContainerError": REASON_CONTAINER_CREATE_FAILED,
    "RunContainerError": REASON_CONTAINER_CREATE_FAILED,
    "CrashLoopBackOff": REASON_CONTAINER_CRASH_LOOP,
}

# --- Clean-pod policy: which pods go when the job ends (Kubeflow's runPolicy.cleanPodPolicy) --
CLEAN_POD_NONE = "None"        # keep every pod (logs, debugging)
CLEAN_POD_RUNNING = "Running"  # delete the ones still running or pending (default)
CLEAN_POD_ALL = "All"          # delete every pod, failed ones too

# Data sets generated in the pods: they mount no host directory.
GENERATED_DATASETS = frozenset({"synthetic", "synthetic-easy"})

# --- Models the operator knows, by layer count (split points are 0..layers-1) ---------------
# The operator image carries no torch, so it cannot build a model to count its layers; a unit
# test checks this table against ares.core.models, so it cannot drift.
MODEL_LAYERS = {"vgg5": 7, "resnet18": 6}

# --- Resources every container gets unless the job says otherwise (see builders.resources) ---
# A default limit never falls below the job's own request for that resource.
DEFAULT_RESOURCES = {
    CONTAINER_SERVER: {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
    CONTAINER_DEVICE: {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "4", "memory": "2Gi"}},
    CONTAINER_SIDECAR: {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}},
    CONTAINER_PREPARE: {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
}

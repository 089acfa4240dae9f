"""Where the study runs: an embedded local Ray, or an existing cluster (`--address
auto|ray://...`).

Authentication: Ray 2.60 turns token authentication on for a new local Ray
(docs/pitfalls.md#ray-auth). We keep it (anyone who can reach an unauthenticated Ray can run code on
it) and bind the dashboard to 127.0.0.1 only; `describe_dashboard` tells the user how to open it
(the page asks for the token that `ray get-auth-token` prints; from another machine, tunnel the port
with ssh). RAY_AUTH_MODE=disabled in the environment opts out, as Ray documents.

On a multi-node cluster every node writes trial folders into the study folder and reads the pixel
cache from it, so the study folder must be on a filesystem all nodes share; `check_shared_storage`
proves it with a marker file read back on every node, and refuses the study with a clear message
otherwise.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import ray
from ray._private import services as ray_services
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fer.core.errors import UserError
from study.tune.options import Resources

LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # trials read pixels from files, not from the object store
# Ray starts its workers 15 nice levels below the raylet, so trials (the study's whole work) would
# yield the CPU to any other process on the machine; a local study's trials run at the user's own
# priority (`nice fer-study run ...` still lowers them). An RAY_worker_niceness already set is kept.
LOCAL_WORKER_NICENESS = "0"


# glibc gives a process up to 8 malloc arenas per core; a warm worker's many backend threads then
# fragment them, and under JAX its resident memory crept up from trial to trial (flat with 2 arenas:
# docs/pitfalls.md#malloc-arenas). A MALLOC_ARENA_MAX already set is kept.
WORKER_MALLOC_ARENAS = "2"


# A warm worker takes the next trial only once the last one's thread has ended, and Tune waits for
# that TUNE_FUNCTION_THREAD_TIMEOUT_S (default 2 s) before failing the NEW trial with "Trainable
# runner reuse requires reset_config() to be implemented and return True". A trial the scheduler
# stops unwinds out of Keras's fit, and TensorFlow's tf.data teardown there can take longer than 2 s
# on a busy CPU. A value already set is kept (docs/pitfalls.md#reuse-timeout).
WORKER_THREAD_TIMEOUT_S = "120"


def worker_env() -> dict:
    """Environment every trial process needs: the driver's Keras backend, quiet TensorFlow, few
    malloc arenas (set when Ray starts the worker process, before its first allocation), Tune's wait
    for a finished trial."""
    env = {
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", WORKER_MALLOC_ARENAS),
        "TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get(
            "TUNE_FUNCTION_THREAD_TIMEOUT_S", WORKER_THREAD_TIMEOUT_S
        ),
    }
    for var in ("KERAS_BACKEND", "FER_THREADS"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


@contextmanager
def _raylet_environment(env: dict):
    """Give a local Ray's processes `env` by inheritance instead of a job runtime env.

    Ray prestarts one idle worker process per CPU when it starts, but only a job without a runtime
    env can use them: with `runtime_env.env_vars` every slot's first trial waited for a new process
    (docs/benchmarks.md). The raylet (and so every
    worker it starts) inherits the environment ray.init runs in; the driver's own is restored
    afterwards. A cluster joined with --address keeps the runtime env, since its raylets were
    started elsewhere.
    """
    saved = {var: os.environ.get(var) for var in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


# How long the pre-flight probe lets Ray's GCS client try a port that answers TCP but may not be
# Ray (Ray's own defaults wait 30-60 s per step, printing a warning each time), and the hard limit
# on the probe process as a whole.
PROBE_CONNECT_TIMEOUT_S = "3"
PROBE_LIMIT_S = 45
TCP_PROBE_TIMEOUT_S = 5
AUTH_HELP = (
    "set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, in a file named by "
    "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
)


def resolve_address(address: str) -> str:
    """HOST:PORT of the cluster's GCS, resolved as ray.init resolves it (`auto`: RAY_ADDRESS, else
    the latest cluster started on this machine), so the probe checks what Ray would join."""
    try:
        resolved = ray_services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise UserError(f"--address {address}: {_first_line(exc)}") from None
    if resolved is None:
        raise UserError(f"--address {address}: no Ray cluster found to join")
    return resolved


def check_reachable(address: str) -> None:
    """Refuse, in seconds and naming the address, a cluster that cannot be joined.

    Left to ray.init, a closed port was still being retried after 200 s, and a token-auth head
    joined without the token gave ~30 lines of warnings over 30 s and then "Failed to connect",
    which names neither the token nor how to give it. A TCP probe finds a closed port; a GCS
    client in a child process (its warnings captured, Ray's connect timeouts shortened) finds a
    port that is not Ray and a refused token. `ray://` (Ray Client) addresses are left to Ray.
    """
    if address.startswith("ray://"):
        return
    resolved = resolve_address(address)
    host, _, port = resolved.rpartition(":")
    named = address if address == resolved else f"{address} ({resolved})"
    try:
        socket.create_connection((host.strip("[]"), int(port)), TCP_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise UserError(
            f"no Ray cluster at {named}: cannot connect to its port ({exc.__class__.__name__}: "
            f"{exc}); give the head's GCS address (`ray start --head --port`, default 6379)"
        ) from None
    verdict = _probe_gcs(resolved, token_found_by_ray=address == "auto")
    if verdict == "ok":
        return
    if verdict.startswith("auth"):
        state = _token_state(address)
        raise UserError(f"the Ray cluster at {named} wants an auth token and {state}")
    raise UserError(f"no Ray cluster answers at {named}: {verdict}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]


def _token_state(address: str) -> str:
    """Why the cluster refused this driver, and the fix. Ray uses a token only in token mode, and
    with an explicit address only when RAY_AUTH_MODE=token says so (it infers the mode from a
    token on disk only for `auto`)."""
    if not _driver_has_token():
        return f"the driver has none: {AUTH_HELP}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" and address != "auto":
        return "the driver has one but does not send it: set RAY_AUTH_MODE=token"
    return f"rejects this driver's token: {AUTH_HELP}"


def _driver_has_token() -> bool:
    """Whether Ray would find a token for this driver (its three places, in Ray's order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def _probe_gcs(address: str, token_found_by_ray: bool) -> str:
    """`ok`, `auth: ...` or why not, from a GCS client in a child process: Ray reads its connect
    timeouts once per process, and its C++ client writes warnings straight to stderr."""
    env = dict(os.environ)
    for var in ("gcs_rpc_server_connect_timeout_s", "gcs_rpc_server_reconnect_timeout_s"):
        env.setdefault(f"RAY_{var}", PROBE_CONNECT_TIMEOUT_S)
    call = f"_probe_main({address!r}, {token_found_by_ray!r})"
    code = f"from study.tune.cluster import _probe_main; {call}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=PROBE_LIMIT_S,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
    except subprocess.TimeoutExpired:
        return f"its port is open but nothing answered as Ray's GCS within {PROBE_LIMIT_S} s"
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else f"the probe failed: {done.stderr.strip()[-300:]}"


def _probe_main(address: str, token_found_by_ray: bool) -> None:
    """Child side of `_probe_gcs`: ask the GCS for one key, the way ray.init finds its token."""
    from ray._private.authentication import authentication_token_setup as auth
    from ray._raylet import GcsClient

    try:
        if token_found_by_ray:  # as ray.init does for `auto`
            auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        auth.ensure_token_if_auth_enabled(None, create_token_if_missing=False)
        GcsClient(address=address).internal_kv_get(b"session_name", b"session", timeout=10)
        print("ok")
    except ray.exceptions.AuthenticationError as exc:
        print(f"auth: {_first_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - any other failure is reported as the reason
        print(f"Ray's GCS did not answer ({exc.__class__.__name__}: {_first_line(exc)})")


def connect(
    address: str | None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard: bool = True,
) -> dict:
    """Start a local Ray (address None) or join a cluster; return what study.json should record.

    If Ray is already initialised in this process (a test's cluster, a notebook), it is used as it
    is.
    """
    env = worker_env()
    started = False
    if ray.is_initialized():
        context = None
    elif address is None:
        # read by the raylet it starts
        os.environ.setdefault("RAY_worker_niceness", LOCAL_WORKER_NICENESS)
        with _raylet_environment(env):
            context = ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                log_to_driver=False,
                logging_level="ERROR",
            )
        started = True
    else:
        check_reachable(address)
        try:
            context = ray.init(
                address=address,
                log_to_driver=False,
                runtime_env={"env_vars": env},
                logging_level="ERROR",
            )
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise UserError(
                f"could not join the Ray cluster at {address}: {_first_line(exc)}"
            ) from None
        started = True
    dashboard_url = getattr(context, "dashboard_url", None) if context is not None else None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "address": address or "local",
        "started_here": started,
        "dashboard_url": f"http://{dashboard_url}"
        if dashboard_url and "://" not in dashboard_url
        else dashboard_url,
        "auth_mode": os.environ.get("RAY_AUTH_MODE", "unset"),
        "nodes": len(nodes),
        "resources": {
            k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")
        },
    }


def describe_dashboard(info: dict) -> str:
    url = info.get("dashboard_url")
    if not url:
        return "Ray dashboard: off"
    lines = [f"Ray dashboard: {url}"]
    if info.get("auth_mode", "").lower() == "token":
        lines.append(
            "  token authentication is on: the page asks for the token that "
            "`ray get-auth-token` prints"
        )
    port = url.rsplit(":", 1)[-1].strip("/")
    if "127.0.0.1" in url or "localhost" in url:
        lines.append(
            f"  it listens on this machine only; from another one: ssh -L {port}:127.0.0.1:{port} "
            f"THIS_HOST, then open http://127.0.0.1:{port}"
        )
    return "\n".join(lines)


def default_gpus_per_trial() -> float:
    """One GPU per trial where the cluster has GPUs, none otherwise."""
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_trial_fits(resources: Resources) -> None:
    """Refuse a per-trial request that no node can ever satisfy (Tune would wait forever)."""
    cpus, gpus = resources.cpus, resources.gpus
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for node in nodes:
        res = node.get("Resources", {})
        if res.get("CPU", 0) >= cpus and res.get("GPU", 0) >= gpus:
            return
    biggest = max(
        ((n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes),
        default=(0, 0),
    )
    raise UserError(
        f"a trial asks for {cpus:g} CPU and {gpus:g} GPU but the largest node has "
        f"{biggest[0]:g} CPU and {biggest[1]:g} GPU (lower --cpus-per-trial / --gpus-per-trial)"
    )


def concurrent_trials(resources: Resources) -> int:
    """How many trials the cluster can run at once, node by node (each trial must fit on one
    node)."""
    cpus, gpus = resources.cpus, resources.gpus
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fits = int(res.get("CPU", 0) // cpus + 1e-9)
        if gpus:
            fits = min(fits, int(res.get("GPU", 0) / gpus + 1e-9))
        total += fits
    return max(1, total)


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared_storage(study_dir: Path, timeout_s: float = 120) -> None:
    """On a multi-node cluster, prove every node sees the study folder; else refuse with a clear
    message."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    study_dir = Path(study_dir).resolve()
    token = secrets.token_hex(16)
    marker = study_dir / f".shared-storage-check-{token[:8]}"
    marker.write_text(token)
    try:
        refs = {
            node["NodeManagerAddress"] + f" ({node['NodeID'][:8]})": _read_marker.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    finally:
        marker.unlink(missing_ok=True)
    blind = [node for node, text in seen.items() if text != token]
    if blind:
        raise UserError(
            f"the study folder {study_dir} is local to this machine: node(s) {', '.join(blind)} "
            "cannot see it: give the study a home in object storage with --storage URI "
            "(docs/cluster.md), or run from a folder every node mounts at the same path (NFS)"
        )


def _backend_gpus() -> tuple[str, int]:
    """In a worker holding a trial's GPU share: the Keras backend and the GPUs it can use there."""
    from study.tune.trainable import import_keras_lean

    import_keras_lean()
    from fer.runtime.backend import backend_gpu_count, backend_name

    return backend_name(), backend_gpu_count()


def check_backend_sees_gpus(gpus: float) -> None:
    """Before any trial: a task with one trial's GPU share checks that the backend can use a GPU
    there, so a CPU-only JAX/TensorFlow on a GPU node stops the study with the fix instead of
    training on the CPU."""
    if not gpus:
        return
    from fer.runtime.devices import check_backend_gpus

    probe = ray.remote(_backend_gpus).options(num_cpus=0, num_gpus=gpus, max_retries=0)
    backend, usable = ray.get(probe.remote())
    check_backend_gpus(
        gpus, usable, backend, f"trials ask for {gpus:g} GPU each", "pass --gpus-per-trial 0"
    )

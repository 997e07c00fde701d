"""deploy/: the container image, the compose stack with Prometheus + Grafana, and the k8s example.

Checked without a Docker daemon:
- prometheus.yml passes `promtool check config` (skipped where promtool is missing: Debian
  package `prometheus`) and scrapes the compose service `kiln` on the image's port.
- The Grafana dashboard parses; every kiln_* series its queries use exists in a live /metrics
  scrape after a few requests, with data in it; label names in `by (...)`, matchers and legends
  exist on those series; every expression is valid PromQL (`promtool check rules`); panels cover
  request rate, TTFT and inter-token quantiles, tokens/s, running/waiting and KV-cache usage.
- compose.yaml parses, publishes 8000/9090/3000, mounts files that exist, and the Grafana
  datasource, dashboard provider and Prometheus target agree with it.
- The Dockerfile: base image and torch index as build args (torch pinned as in the Makefile),
  a non-root user, a C++ compiler and the native CPU decode step built as that user after the project
  is installed, `kiln serve` on 0.0.0.0 as entrypoint (flags parsed by the real parser), only
  copied paths let through by its .dockerignore, and a HEALTHCHECK whose command, run here
  against a live server, passes when ready and fails while the model loads.
- k8s: probes on /health at the container's port, Service and ServiceMonitor selecting it.
Where `docker info` answers: the image builds, serves a tiny model on the native decode step, and /health
answers.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.cli import load_engine
from server.app import create_app
from server.settings import ServerSettings, build_parser
from server.testing import LiveServer

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kiln.json"
# what the issue asks the dashboard to show
REQUIRED_SERIES = {"kiln_requests_total", "kiln_time_to_first_token_seconds_bucket",
                   "kiln_inter_token_latency_seconds_bucket", "kiln_generation_tokens_total",
                   "kiln_num_requests_running", "kiln_num_requests_waiting", "kiln_kv_cache_usage_ratio"}
TARGET_LABELS = {"instance", "job", "service"}  # added by Prometheus at scrape time (service: prometheus.yml)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


# ---- helpers ----------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in dockerfile_instructions() if word == "ARG" and "=" in arg)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for pattern in (p.strip() for p in lines):
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern == "**" or any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
                                  for p in prefixes):
            ignored = not negate
    return ignored


def image_user() -> tuple[str, int]:
    """(name, uid) of the user the Dockerfile creates with useradd."""
    useradd = next(cmd for _, a in dockerfile_instructions() for cmd in a.split(";") if "useradd" in cmd)
    return useradd.split()[-1], int(re.search(r"--uid (\d+)", useradd).group(1))


def image_port() -> int:
    (port,) = [int(arg) for word, arg in dockerfile_instructions() if word == "EXPOSE"]
    return port


def dashboard_targets() -> list[tuple[dict, dict]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel, target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, as Prometheus would receive it."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def series_in(expr: str) -> set[str]:
    return set(re.findall(r"\bkiln_[a-zA-Z0-9_]+\b", expr))


def scrape(url: str) -> dict[str, tuple[set[str], float]]:
    """Series name -> (label names, sum of sample values) from a /metrics scrape."""
    out: dict[str, tuple[set[str], float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            labels, total = out.get(sample.name, (set(), 0.0))
            out[sample.name] = (labels | set(sample.labels), total + sample.value)
    return out


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def kiln_serve_args(argv: list[str]):
    """Flags as `kiln serve` parses them (argparse exits 2 on an unknown or malformed flag)."""
    return build_parser().parse_args(argv)


# ---- a live scrape ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_metrics(llama_dir):
    """/metrics of a live server after a streamed and a plain completion, a perplexity job, a 404, a
    repeated prompt (prefix-cache hits) and two long requests that overflow a small KV pool (a preemption)."""
    # 17 blocks of 4: one full 64-token sequence; two long ones at once cannot both fit
    engine = load_engine(str(llama_dir), "cpu", None, max_batch_size=2, block_size=4, num_blocks=17)
    with LiveServer(create_app(engine, ServerSettings(served_model_name="tiny"))) as server:
        url = server.url
        long = {"prompt": "The quick brown fox jumps", "max_tokens": 48, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda _: httpx.post(url + "/v1/completions",
                                                                                  json=long, timeout=60), range(2)))
        again = {"prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 2}
        for _ in range(2):  # the second finds the first one's full blocks in the prefix cache
            assert httpx.post(url + "/v1/completions", json=again, timeout=60).status_code == 200
        with httpx.stream("POST", url + "/v1/completions", json={
                "prompt": "The quick brown", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())
        r = httpx.post(url + "/v1/completions", json={"prompt": "To be", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        r = httpx.post(url + "/v1/perplexity", json={"input": "To be, or not to be"})
        assert r.status_code == 200, r.text
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "model": "nope"}).status_code == 404
        return scrape(url)


# ---- Prometheus -------------------------------------------------------------------------
def test_prometheus_config_passes_promtool():
    tool = promtool()
    r = subprocess.run([tool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_compose_service():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kiln"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert targets == [f"kiln:{image_port()}"] and "kiln" in services, targets


# ---- Grafana dashboard ------------------------------------------------------------------
def test_dashboard_series_exist_in_a_live_scrape(live_metrics):
    used = set().union(*(series_in(t["expr"]) for _, t in dashboard_targets()))
    missing = sorted(used - set(live_metrics))
    assert not missing, f"the dashboard queries series /metrics does not have: {missing}"
    assert REQUIRED_SERIES <= used, f"the dashboard lacks {sorted(REQUIRED_SERIES - used)}"
    # the requests above put data in every counter and histogram the dashboard plots
    empty = sorted(name for name in used if name.endswith(("_total", "_bucket")) and live_metrics[name][1] <= 0)
    assert not empty, f"no data after serving requests: {empty}"
    for name in ("kiln_time_to_first_token_seconds", "kiln_inter_token_latency_seconds"):
        assert live_metrics[name + "_count"][1] >= 2, (name, live_metrics[name + "_count"])


def test_dashboard_labels_exist(live_metrics):
    for panel, target in dashboard_targets():
        expr = target["expr"]
        series = series_in(expr)
        assert series, f"panel {panel['title']!r}: {expr!r} queries no kiln series"
        known = TARGET_LABELS | set().union(*(live_metrics[s][0] for s in series if s in live_metrics))
        by = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
        matched = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", expr))))
        assert by | matched <= known, f"panel {panel['title']!r}: labels {sorted((by | matched) - known)} unknown"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= (by if by else known), f"panel {panel['title']!r}: legend {legend} not in the result"


def test_dashboard_queries_are_valid_promql(tmp_path):
    tool = promtool()
    rules = [{"record": f"kiln_dashboard:panel_{panel['id']}_{target['refId']}", "expr": concrete(target["expr"])}
             for panel, target in dashboard_targets()]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout + r.stderr


def test_dashboard_shape():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    quantiles = {}
    for _, target in dashboard_targets():
        q = re.match(r"histogram_quantile\(([\d.]+), sum by \(le\) \(rate\((\w+)_bucket", target["expr"])
        if q:
            quantiles.setdefault(q.group(2), set()).add(float(q.group(1)))
    for name in ("kiln_time_to_first_token_seconds", "kiln_inter_token_latency_seconds"):
        assert {0.5, 0.9, 0.99} <= quantiles.get(name, set()), (name, quantiles.get(name))
    # the datasource variable defaults to the datasource compose provisions
    (datasource,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)


# ---- compose ----------------------------------------------------------------------------
def test_compose_stack():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"kiln", "prometheus", "grafana"}
    port = image_port()
    assert services["kiln"]["ports"] == [f"{port}:{port}"]
    assert services["prometheus"]["ports"] == ["9090:9090"] and services["grafana"]["ports"] == ["3000:3000"]
    build = services["kiln"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    kiln_serve_args(services["kiln"]["command"])  # flags the image's `kiln serve` accepts
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./") and source != "./models":  # ./models: the user's own models
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = DEPLOY / source
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    # Grafana: datasource -> the prometheus service; provider path -> the mounted dashboards
    (datasource,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana/provisioning"
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kiln.yml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[str(Path(home).parent)] / Path(home).name) == DASHBOARD


# ---- Dockerfile -------------------------------------------------------------------------
def test_dockerfile():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    args = dockerfile_args()
    assert [a for w, a in instructions if w == "FROM"] == ["${BASE_IMAGE}"]
    assert args["BASE_IMAGE"].startswith("python:3.11")
    makefile_torch = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch == "2.13.0"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = [a for w, a in instructions if w == "RUN"]
    torch_run = next(i for i, a in enumerate(runs) if '"torch==${TORCH_VERSION}"' in a)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_run]
    project_run = next(i for i, a in enumerate(runs) if "pip install /tmp/kiln-src" in a)
    assert torch_run < project_run, "torch must come from its index before the project pulls it from PyPI"
    # the native CPU decode step: a C++ compiler by default, the module built at image build time by the user
    # that runs the server (its cache is that user's home), after the project is installed
    assert "g++" in args["CXX_PACKAGES"].strip('"').split()
    assert "${CXX_PACKAGES}" in runs[0] and "apt-get install" in runs[0]
    native_run = runs.index("python -m model.native")
    assert native_run > project_run
    cache_env = next(a for w, a in instructions if w == "ENV" and a.startswith("KILN_CACHE_DIR="))
    assert cache_env.split("=", 1)[1].startswith(f"/home/{image_user()[0]}/")  # the user's (useradd --create-home)
    instruction_of = [(w, a) for w, a in instructions if w in ("USER", "RUN")]
    assert instruction_of.index(("USER", image_user()[0])) < instruction_of.index(("RUN", "python -m model.native"))

    user = [a for w, a in instructions if w == "USER"]
    assert user and user[-1] == image_user()[0] and words.index("USER") < words.index("ENTRYPOINT")
    assert image_user()[1] >= 1000, image_user()
    entrypoint = json.loads(next(a for w, a in instructions if w == "ENTRYPOINT"))
    assert entrypoint[:2] == ["kiln", "serve"]
    assert "kiln" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    flags = kiln_serve_args(entrypoint[2:])
    assert flags.host == "0.0.0.0" and flags.port == image_port()

    for w, a in instructions:
        if w == "COPY":
            *sources, _ = a.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not dockerignored(source), f"COPY {source}: excluded by Dockerfile.dockerignore"
    for heavy in (".venv", "data", "runs", ".git", "tests"):
        assert dockerignored(heavy), f"{heavy} would be sent to the Docker daemon"


def _healthcheck_command(port: int) -> list[str]:
    health = next(a for w, a in dockerfile_instructions() if w == "HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[0] == "python" and f"127.0.0.1:{image_port()}/health" in command[-1], command
    return [sys.executable] + [c.replace(f":{image_port()}/", f":{port}/") for c in command[1:]]


def test_dockerfile_healthcheck_command(llama_dir):
    """The HEALTHCHECK command itself, pointed at a live server: 0 when ready, not 0 while loading."""
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return load_engine(str(llama_dir), "cpu", None, max_batch_size=1)

    with LiveServer(create_app(slow_load, ServerSettings(served_model_name="tiny"))) as server:
        loading = subprocess.run(_healthcheck_command(server.port), capture_output=True, text=True, timeout=30)
        assert loading.returncode != 0 and "503" in loading.stderr, loading.stderr[-500:]
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        ready = subprocess.run(_healthcheck_command(server.port), capture_output=True, text=True, timeout=30)
        assert ready.returncode == 0, ready.stderr[-500:]


# ---- Kubernetes -------------------------------------------------------------------------
def test_k8s_manifests():
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    assert {"Deployment", "Service", "ServiceMonitor"} <= set(docs)
    deployment, service, monitor = docs["Deployment"], docs["Service"], docs["ServiceMonitor"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": image_port()}
    kiln_serve_args(container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == image_port(), probe
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == image_user()[1]
    assert pod["spec"]["terminationGracePeriodSeconds"] > ServerSettings().shutdown_timeout_s
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == image_port()

    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports and service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"


# ---- with a Docker daemon ---------------------------------------------------------------
def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_image_builds_and_serves(llama_dir, tmp_path):
    if not docker_available():
        pytest.skip("no Docker daemon (`docker info` fails)")
    tag = "kiln-test:pytest"
    build = subprocess.run(["docker", "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    models = tmp_path / "models"
    shutil.copytree(llama_dir, models / "tiny")
    for path in [models, *models.rglob("*")]:  # readable by the image's non-root user
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    run = subprocess.run(["docker", "run", "-d", "-p", "127.0.0.1::8000", "-v", f"{models}:/models:ro", tag,
                          "--model", "/models/tiny", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        port = subprocess.run(["docker", "port", container, "8000/tcp"], capture_output=True, text=True,
                              timeout=30).stdout.strip().rsplit(":", 1)[-1]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, subprocess.run(["docker", "logs", container], capture_output=True,
                                                               text=True).stderr[-3000:]
            time.sleep(1)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        assert httpx.get(url + "/").status_code == 200  # the playground ships in the image
        user = subprocess.run(["docker", "exec", container, "id", "-u"], capture_output=True, text=True).stdout
        assert int(user) == image_user()[1]
        # the native CPU decode step was built by `docker build` on this host: in use from the start
        logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=30)
        assert "decode native (" in logs.stdout + logs.stderr, logs.stderr[-3000:]
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=60)

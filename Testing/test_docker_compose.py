"""docker-compose.yml is wired like production: nginx in front of N gateway replicas, every
.env setting in every gateway container, models.json mounted, restart policies, health checks
with start periods, and scheduled maintenance. No Docker engine runs on the test machines, so
the file is parsed and its wiring checked here (and the nginx file it mounts is checked with a
real `nginx -t`)."""
from __future__ import annotations

import re

import pytest
import yaml

import db_manager
from app.config import ROOT_DIR
from Testing.nginx import SHIPPED_CONF, NginxProcess
from Testing.test_documentation import env_example_names, provider_variables

# What the compose file itself sets in the gateway containers (the addresses of its services and
# the paths inside the image); everything else comes from .env through env_file.
COMPOSE_OWNED = {"DATABASE_URL", "REDIS_URL", "SYSTEM_SECRET", "MODELS_FILE", "USAGE_SPOOL_DIR", "HOST", "PORT",
                 "PROMETHEUS_MULTIPROC_DIR"}
APP_SERVICES = ("migrate", "gateway", "maintenance")   # run the gateway image with its settings


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT_DIR / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_the_services_of_a_production_deployment(services):
    """Data stores, the one-shot migration, the replicas, the scheduler and the load balancer."""
    assert set(services) == {"postgres", "redis", "migrate", "gateway", "maintenance", "nginx"}


def test_gateway_publishes_no_host_port_so_it_scales(services):
    """`docker compose up --scale gateway=3` works: only nginx binds a host port."""
    gateway = services["gateway"]
    assert "ports" not in gateway
    assert gateway["expose"] == ["8000"]
    assert gateway["environment"]["PORT"] == "8000" and gateway["environment"]["HOST"] == "0.0.0.0"
    published = [name for name, svc in services.items() if "ports" in svc]
    assert published == ["nginx"]
    assert services["nginx"]["ports"] == ["${GATEWAY_PORT:-8000}:8000"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_env_setting_reaches_the_app_containers(services, name):
    """.env goes whole into each container running the gateway image (env_file); the compose
    file only sets the addresses of its own services, and never hides a setting of .env."""
    svc = services[name]
    assert svc["env_file"] == [{"path": ".env", "required": False}]
    env = svc["environment"]
    assert set(env) <= COMPOSE_OWNED, set(env) - COMPOSE_OWNED
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://gateway:") and "@postgres:5432/gateway" in env["DATABASE_URL"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["SYSTEM_SECRET"].startswith("${SYSTEM_SECRET:?")   # refuses to start without one
    assert env["MODELS_FILE"] == "/srv/gateway/data/models.json"


def test_env_example_holds_every_provider_variable_env_file_passes(services):
    """A provider configured in .env reaches the gateway: env_file passes .env as a whole, and
    .env.example (the template of .env) names every variable data/models.json reads."""
    assert provider_variables() - env_example_names() == set()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_models_file_is_mounted_not_baked_in(services, name):
    """data/ is a read-only bind mount holding MODELS_FILE (edit it, then reload; the directory,
    so that an editor replacing the file is seen), and the usage spool is on a named volume that
    outlives the containers."""
    volumes = services[name]["volumes"]
    assert "./data:/srv/gateway/data:ro" in volumes
    assert services[name]["environment"]["MODELS_FILE"].startswith("/srv/gateway/data/")
    assert "usagespool:/srv/gateway/instance" in volumes
    assert services[name]["environment"]["USAGE_SPOOL_DIR"].startswith("/srv/gateway/instance/")


def test_bind_mounts_exist_and_named_volumes_are_declared(compose, services):
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT_DIR / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_dependencies_start_things_in_order(services):
    """Migrations after PostgreSQL is healthy; replicas and the scheduler after the migration
    succeeded; nginx after a healthy replica. A `service_healthy` dependency has a health check."""
    def deps(name: str) -> dict:
        return {dep: cond["condition"] for dep, cond in services[name]["depends_on"].items()}

    assert deps("migrate") == {"postgres": "service_healthy"}
    assert deps("gateway") == {"migrate": "service_completed_successfully", "postgres": "service_healthy",
                               "redis": "service_healthy"}
    assert deps("maintenance") == {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    assert deps("nginx") == {"gateway": "service_healthy"}
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            if cond["condition"] == "service_healthy":
                assert "test" in services[dep]["healthcheck"], f"{name} waits for {dep}'s health, which has no check"


def test_restart_policies(services):
    """Long-running services come back after a crash or a reboot; the migration runs once."""
    assert services["migrate"]["restart"] == "no"
    for name in ("postgres", "redis", "gateway", "maintenance", "nginx"):
        assert services[name]["restart"] == "unless-stopped", name


@pytest.mark.parametrize("name", ["postgres", "redis", "gateway", "nginx"])
def test_health_checks_have_start_periods(services, name):
    check = services[name]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert re.fullmatch(r"\d+s", check["start_period"]) and int(check["start_period"][:-1]) > 0
    assert check["retries"] >= 3


def test_gateway_health_check_probes_its_own_health_endpoint(services):
    assert "http://127.0.0.1:8000/health" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/nginx-health" in " ".join(services["nginx"]["healthcheck"]["test"])


def test_stop_grace_period_outlasts_the_graceful_timeout(services):
    """Docker must not SIGKILL workers that are still finishing streams (GRACEFUL_TIMEOUT 30 s)."""
    assert int(services["gateway"]["stop_grace_period"].rstrip("s")) > 30


def test_app_services_run_real_commands(services):
    """The migration and the scheduler run db_manager commands that exist; the scheduler's
    `maintain` takes a Redis lock per period, so scaling it or adding cron never runs it twice."""
    commands = set(db_manager.build_parser()._subparsers._group_actions[0].choices)
    assert services["migrate"]["command"] == ["python", "db_manager.py", "create-db"]
    scheduler = services["maintenance"]["command"]
    assert scheduler[:3] == ["python", "db_manager.py", "maintain"] and scheduler[3] == "--every"
    assert {"create-db", "maintain"} <= commands
    assert "command" not in services["gateway"]   # the image's CMD: gunicorn -c gunicorn.config.py
    assert "gunicorn.config.py" in (ROOT_DIR / "Dockerfile").read_text()


def test_nginx_is_the_official_image_with_the_shipped_config(services):
    nginx = services["nginx"]
    assert re.fullmatch(r"nginx:1\.(2[89]|[3-9]\d)[\w.-]*", nginx["image"])   # `resolve` needs 1.27.3+
    assert nginx["volumes"] == ["./deploy/nginx/gateway.conf:/etc/nginx/conf.d/default.conf:ro"]


def test_nginx_upstream_names_the_gateway_service(services):
    """The upstream is the compose service `gateway` on its PORT, re-resolved through Docker's
    DNS (so scaled replicas join), and the server listens on the port compose publishes."""
    conf = SHIPPED_CONF.read_text()
    upstream = re.search(r"upstream gateway \{(.*?)\n\}", conf, re.S).group(1)
    assert re.search(r"^\s*server gateway:8000 resolve\b", upstream, re.M)
    assert "zone " in upstream and re.search(r"^\s*keepalive \d+;", upstream, re.M)
    assert re.search(r"^resolver 127\.0\.0\.11 valid=\d+s", conf, re.M)
    assert re.search(r"^\s*listen 8000;", conf, re.M)
    assert "proxy_pass http://gateway;" in conf
    assert "gateway" in services and services["gateway"]["expose"] == ["8000"]


def test_nginx_retries_on_the_other_replica_and_streams_unbuffered():
    conf = SHIPPED_CONF.read_text()
    assert re.search(r"proxy_next_upstream error timeout non_idempotent;", conf)
    assert "proxy_buffering off;" in conf and "proxy_http_version 1.1;" in conf
    assert 'proxy_set_header Connection "";' in conf


def test_shipped_nginx_config_passes_nginx_t():
    """The real nginx accepts the shipped file (as the test replicas run it)."""
    nginx = NginxProcess([1, 2])
    try:
        result = nginx.check()
    finally:
        nginx.stop()
    assert result.returncode == 0, result.stderr


def test_each_replica_keeps_its_metrics_files_in_memory(services):
    """The metrics' multiprocess directory of a replica is its own tmpfs: replicas never sum
    each other's files (Prometheus scrapes each one, or nginx's one at a time), and the
    gunicorn master empties it at start."""
    gateway = services["gateway"]
    assert gateway["environment"]["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/gateway-metrics"
    assert gateway["tmpfs"] == ["/tmp/gateway-metrics"]

"""Bad input to the local environment: each case gives one clear error or recovers,
and leaves no process behind.

These tests start their own servers in temporary state folders, so they never
touch the shared `make env-up` environment.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openchecker_testenv import controlplane, environment, rabbitmq, session
from openchecker_testenv.binaries import ASSETS_VARIABLE, ControlPlaneBinaries, resolve_binaries
from openchecker_testenv.broker import Broker
from openchecker_testenv.controlplane import LocalControlPlane
from openchecker_testenv.errors import SetupError
from openchecker_testenv.layout import StateLayout
from openchecker_testenv.ports import reserve_free_ports
from openchecker_testenv.processes import ManagedProcess, ProcessRecord, read_process_stat
from support import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with a listening socket on it for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _busy_on_first_call(
    busy_port: int, index: int
) -> tuple[list[int], Callable[[int], list[int]]]:
    """Return a call log and a reserve_free_ports stand-in whose first result
    has `busy_port` at `index`."""
    calls: list[int] = []

    def reserve(count: int) -> list[int]:
        calls.append(count)
        ports = reserve_free_ports(count)
        if len(calls) == 1:
            ports[index] = busy_port
        return ports

    return calls, reserve


def _recorded_pids(layout: StateLayout) -> list[Path]:
    return sorted(layout.pids.glob("*.json"))


@pytest.mark.parametrize(
    "index", [0, 1, 2], ids=["etcd-client-port", "etcd-peer-port", "apiserver-port"]
)
def test_control_plane_retries_busy_port(
    index: int,
    busy_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    control_plane_binaries: ControlPlaneBinaries,
) -> None:
    calls, reserve = _busy_on_first_call(busy_port, index)
    monkeypatch.setattr(controlplane, "reserve_free_ports", reserve)
    layout = StateLayout(tmp_path)
    local = LocalControlPlane(layout, control_plane_binaries)
    try:
        handle = local.start()
        assert handle.is_ready()
        assert len(calls) == 2
        assert not handle.server.endswith(f":{busy_port}")
    finally:
        local.stop()
    assert _recorded_pids(layout) == []


def test_control_plane_gives_up_on_busy_ports(
    busy_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    control_plane_binaries: ControlPlaneBinaries,
) -> None:
    def reserve(count: int) -> list[int]:
        return [busy_port, *reserve_free_ports(count - 1)]

    monkeypatch.setattr(controlplane, "reserve_free_ports", reserve)
    layout = StateLayout(tmp_path)
    with pytest.raises(SetupError) as raised:
        LocalControlPlane(layout, control_plane_binaries).start()
    message = str(raised.value)
    assert "failed to bind a free port 3 times" in message
    assert "address already in use" in message
    assert _recorded_pids(layout) == []


@pytest.mark.parametrize("index", [0, 2, 3], ids=["amqp-port", "distribution-port", "epmd-port"])
def test_broker_retries_busy_port(
    index: int, busy_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, reserve = _busy_on_first_call(busy_port, index)
    monkeypatch.setattr(rabbitmq, "reserve_free_ports", reserve)
    layout = StateLayout(tmp_path)
    local = rabbitmq.LocalRabbitMQ(layout)
    try:
        broker = local.start()
        assert broker.is_ready()
        assert len(calls) == 2
        assert broker.amqp_port != busy_port
    finally:
        local.stop()
    assert _recorded_pids(layout) == []


def test_broken_broker_config_shows_log(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    local = rabbitmq.LocalRabbitMQ(layout, extra_config="this line is not valid")
    with pytest.raises(SetupError) as raised:
        local.start()
    message = str(raised.value)
    assert "rabbitmq-server exited" in message
    # The first error of the log is the cause, even though a crash report
    # follows it.
    assert "Syntax error" in message
    assert "rabbitmq.conf" in message
    assert _recorded_pids(layout) == []


def test_up_stops_control_plane_when_broker_fails(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    control_plane_binaries: ControlPlaneBinaries,
) -> None:
    monkeypatch.delenv("RABBITMQ_URL", raising=False)
    monkeypatch.setenv(ASSETS_VARIABLE, str(control_plane_binaries.folder))
    broken = functools.partial(rabbitmq.LocalRabbitMQ, extra_config="this line is not valid")
    monkeypatch.setattr(environment, "LocalRabbitMQ", broken)
    layout = StateLayout(tmp_path)
    with pytest.raises(SetupError, match="rabbitmq-server exited"):
        environment.up(layout)
    assert _recorded_pids(layout) == []
    assert not layout.kubeconfig.exists()
    assert not layout.state_file.exists()
    assert not layout.env_file.exists()


def _record_of_exited_process(name: str) -> ProcessRecord:
    """Return a record of a process that ran and exited, as a crashed run leaves it."""
    process = subprocess.Popen(["sleep", "0.2"])
    stat = read_process_stat(process.pid)
    assert stat is not None
    process.wait()
    return ProcessRecord(name, process.pid, stat.start_ticks, ["sleep", "0.2"], f"{name}.log")


def test_up_cleans_up_crashed_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    control_plane_binaries: ControlPlaneBinaries,
) -> None:
    monkeypatch.delenv("RABBITMQ_URL", raising=False)
    monkeypatch.setenv(ASSETS_VARIABLE, str(control_plane_binaries.folder))
    layout = StateLayout(tmp_path)
    environment.up(layout)
    try:
        crashed = environment.load_process_records(layout)
        assert {record.name for record in crashed} == {
            "epmd",
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "rabbitmq-server",
        }
        # A crash: the API server dies, the other servers keep running and
        # `down` never runs. Next to them, a record of a process that exited
        # long ago and a record cut short while it was written.
        apiserver = next(record for record in crashed if record.name == "kube-apiserver")
        os.kill(apiserver.pid, signal.SIGKILL)
        wait_for(lambda: not apiserver.is_running(), 10, message="kube-apiserver survived")
        _record_of_exited_process("ghost").save(layout.pids)
        (layout.pids / "truncated.json").write_text('{"name": "trunc')
        assert environment.find_running(layout) is None

        restarted = environment.up(layout)

        for record in crashed:
            assert not record.is_running(), f"{record.name} of the crashed run still runs"
        assert restarted.control_plane.is_ready()
        assert restarted.broker.is_ready()
        assert not (layout.pids / "ghost.json").exists()
        assert not (layout.pids / "truncated.json").exists()
        assert environment.find_running(layout) == restarted
    finally:
        survivors = environment.load_process_records(layout)
        environment.down(layout)
    for record in survivors:
        assert not record.is_running(), f"{record.name} still runs after down"
    assert _recorded_pids(layout) == []


def test_missing_go_reports_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only what the build script needs before its Go check.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname"):
        executable = shutil.which(tool)
        assert executable is not None
        (tools / tool).symlink_to(executable)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(ASSETS_VARIABLE, raising=False)
    with pytest.raises(SetupError) as raised:
        resolve_binaries()
    message = str(raised.value)
    assert "the Go toolchain is not on PATH" in message
    assert "install Go 1.26 or newer" in message
    assert ASSETS_VARIABLE in message


def test_failed_build_shows_go_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    fake_go = tools / "go"
    fake_go.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 2\n")
    fake_go.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv(ASSETS_VARIABLE, raising=False)
    build_log = tmp_path / "build.log"
    with pytest.raises(SetupError) as raised:
        resolve_binaries(build_log=build_log)
    message = str(raised.value)
    assert "simulated compiler failure" in message
    assert "building go.etcd.io/etcd/server/v3 failed" in message
    assert str(build_log) in message
    assert "simulated compiler failure" in build_log.read_text()
    assert list(cache.rglob("etcd-*/etcd")) == []
    assert list(cache.rglob("*.tmp")) == []


def test_assets_folder_without_binaries_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ASSETS_VARIABLE, str(tmp_path))
    with pytest.raises(SetupError) as raised:
        resolve_binaries()
    message = str(raised.value)
    assert "does not contain both etcd and kube-apiserver" in message
    assert str(tmp_path) in message


def test_control_plane_runs_without_controller_manager(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    control_plane_binaries: ControlPlaneBinaries,
) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "etcd").symlink_to(control_plane_binaries.etcd)
    (assets / "kube-apiserver").symlink_to(control_plane_binaries.kube_apiserver)
    monkeypatch.setenv(ASSETS_VARIABLE, str(assets))
    with caplog.at_level(logging.WARNING):
        binaries = resolve_binaries()
    assert binaries.kube_controller_manager is None
    assert "garbage collection" in caplog.text

    layout = StateLayout(tmp_path / "state")
    local = LocalControlPlane(layout, binaries)
    try:
        assert local.start().is_ready()
        records = environment.load_process_records(layout)
        assert {record.name for record in records} == {"etcd", "kube-apiserver"}
    finally:
        local.stop()


def test_unreachable_rabbitmq_url_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    (closed_port,) = reserve_free_ports(1)
    monkeypatch.setenv("RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F")
    monkeypatch.delenv("RABBITMQ_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv(environment.LOCAL_BROKER_MARKER, raising=False)
    broker = environment.broker_from_environment()
    assert broker is not None
    with pytest.raises(SetupError) as raised:
        environment.check_external_broker(broker)
    message = str(raised.value)
    assert "does not respond" in message
    assert "unset RABBITMQ_URL" in message


def test_rabbitmq_url_from_own_env_file_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "amqp://guest:guest@127.0.0.1:5999/%2F"
    monkeypatch.setenv("RABBITMQ_URL", url)
    monkeypatch.setenv(environment.LOCAL_BROKER_MARKER, url)
    assert environment.broker_from_environment() is None


def test_invalid_rabbitmq_url_rejected() -> None:
    with pytest.raises(SetupError, match="must look like amqp://"):
        Broker.from_urls("http://127.0.0.1:15672")


def test_missing_rabbitmq_without_root_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(rabbitmq, "RABBITMQ_SCRIPTS", tmp_path / "missing")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SetupError) as raised:
        rabbitmq.ensure_rabbitmq_installed()
    message = str(raised.value)
    assert "not root" in message
    assert "apt-get install rabbitmq-server" in message
    assert "RABBITMQ_URL" in message


def test_apt_install_failure_shows_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As root, apt-get update runs before apt-get install, and a failure shows its output."""
    monkeypatch.setattr(rabbitmq, "RABBITMQ_SCRIPTS", tmp_path / "missing")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    commands: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        if command[1] == "install":
            return subprocess.CompletedProcess(command, 100, "", "E: simulated mirror failure")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(SetupError) as raised:
        rabbitmq.ensure_rabbitmq_installed()
    assert [command[:2] for command in commands] == [["apt-get", "update"], ["apt-get", "install"]]
    assert "rabbitmq-server" in commands[1]
    assert "simulated mirror failure" in str(raised.value)


def test_abandoned_private_servers_stopped(tmp_path: Path) -> None:
    """A killed test session leaves servers behind; the next session stops them."""
    abandoned = tmp_path / f"{session.PRIVATE_FOLDER_PREFIX}abandoned"
    _record_of_exited_process(session.OWNER_NAME).save(abandoned)
    server = ManagedProcess(
        "server",
        ["sleep", "300"],
        log_file=abandoned / "logs" / "server.log",
        record_folder=StateLayout(abandoned).pids,
    )
    server.start()
    record = ProcessRecord.load(StateLayout(abandoned).pids / "server.json")
    assert record is not None

    in_use = tmp_path / f"{session.PRIVATE_FOLDER_PREFIX}in-use"
    stat = read_process_stat(os.getpid())
    assert stat is not None
    ProcessRecord(session.OWNER_NAME, os.getpid(), stat.start_ticks, ["pytest"], "").save(in_use)

    session.sweep_abandoned_private_folders(tmp_path)

    assert not record.is_running()
    assert not abandoned.exists()
    assert in_use.exists()
    # Reap the killed child of this process.
    assert server.exit_code() is not None

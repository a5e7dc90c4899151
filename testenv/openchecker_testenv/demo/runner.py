"""The demo's steps, from setting up the servers to the summary."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import kubernetes
import pika
import pika.exceptions
import requests
from openchecker_agent.publishing import PublishError, publish_messages

from .. import environment
from ..errors import SetupError
from ..layout import default_state_dir, find_repository_root
from ..processes import ManagedProcess
from .agents import LocalAgentFleet
from .cluster import (
    DemoEnvironment,
    DemoError,
    apply_objects,
    create_namespace,
    delete_namespace,
    delete_resource,
    install_manifests,
    open_environment,
    wait_for_ready_condition,
    write_operator_kubeconfig,
)
from .options import DemoOptions, parse_options
from .progress import ProgressRecorder, kubectl_command, read_queue_figures
from .report import Summary, write_plot
from .resources import (
    DEAD_LETTER_QUEUE_NAME,
    QUEUE_NAME,
    RESOURCE_NAME,
    Outcome,
    PlannedMessage,
    build_broker_secret,
    build_queue_resource,
    plan_messages,
)
from .results import ResultServer

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 90.0
# Seconds an agent gets to finish its task after SIGTERM at the end.
AGENT_STOP_GRACE_SECONDS = 40.0
DELETE_TIMEOUT_SECONDS = 30.0
# The management API refreshes queue figures every 5 s by default.
STATISTICS_SETTLE_SECONDS = 12.0


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


class DemoRun:
    """One run of the demo. `cleanup` stops what it started, in reverse order."""

    def __init__(self, options: DemoOptions, name: str, folder: Path) -> None:
        self.options = options
        # Names the namespace and the vhost the demo creates.
        self.name = name
        self.folder = folder
        self.cleanup = contextlib.ExitStack()
        self.problems: list[str] = []

    def run(self) -> Summary:
        demo = self._set_up_servers()
        api_client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(demo.control_plane.kubeconfig)
        )
        self.cleanup.callback(api_client.close)
        namespace, vhost = self._create_namespace_and_vhost(demo, api_client)
        operator = self._start_operator(demo, namespace)
        self._create_resource(demo, api_client, namespace, vhost, operator)
        return self._run_workload(demo, api_client, namespace, vhost, operator)

    def _set_up_servers(self) -> DemoEnvironment:
        step("Control plane and RabbitMQ")
        demo = open_environment(self.options, self.folder)
        if demo.started_layout is not None:
            layout = demo.started_layout
            self.cleanup.callback(environment.down, layout)
        print(f"kube-apiserver {demo.control_plane.server}", flush=True)
        print(
            f"RabbitMQ {demo.broker.host}:{demo.broker.amqp_port}, management "
            f"{demo.broker.management_url}",
            flush=True,
        )

        step("Install the CRD and the RBAC rules from manifests/")
        applied = install_manifests(demo, repository_root() / "manifests")
        print("Applied " + ", ".join(applied), flush=True)
        print(
            "Skipped Deployment/openchecker-operator: with no container runtime on this "
            "machine, the operator runs as a local process below.",
            flush=True,
        )
        return demo

    def _create_namespace_and_vhost(
        self, demo: DemoEnvironment, api_client: kubernetes.client.ApiClient
    ) -> tuple[str, str]:
        namespace = self.options.namespace or self.name
        if self.options.namespace is None:
            create_namespace(api_client, namespace)
            self.cleanup.callback(delete_namespace, api_client, namespace)
        vhost = self.options.vhost or self.name
        if self.options.vhost is None:
            demo.broker.create_vhost(vhost)
            self.cleanup.callback(demo.broker.delete_vhost, vhost)
        print(f"Namespace {namespace}, vhost {vhost}", flush=True)
        return namespace, vhost

    def _start_operator(self, demo: DemoEnvironment, namespace: str) -> ManagedProcess:
        step("Start the operator with its ServiceAccount's token")
        kubeconfig = write_operator_kubeconfig(demo, self.folder / "operator.kubeconfig")
        operator_environment = dict(os.environ)
        operator_environment["KUBECONFIG"] = str(kubeconfig)
        operator = ManagedProcess(
            "openchecker-operator",
            [
                sys.executable,
                "-m",
                "openchecker_operator",
                "--namespace",
                namespace,
                "--standalone",
            ],
            log_file=self.folder / "operator.log",
            record_folder=self.folder / "pids",
            env=operator_environment,
        )
        operator.start()
        self.cleanup.callback(self._stop_operator, operator)
        print(
            f"The operator runs as system:serviceaccount:openchecker-system:openchecker-operator "
            f"(pid {operator.pid}, log {operator.log_file}).",
            flush=True,
        )
        return operator

    def _stop_operator(self, operator: ManagedProcess) -> None:
        operator.stop()
        log = operator.log_file.read_text(errors="replace")
        forbidden = [line for line in log.splitlines() if "Forbidden" in line or " 403" in line]
        if forbidden:
            self.problems.append(
                f"the operator log has {len(forbidden)} Forbidden errors, the first: "
                f"{forbidden[0].strip()}"
            )

    def _create_resource(
        self,
        demo: DemoEnvironment,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        vhost: str,
        operator: ManagedProcess,
    ) -> None:
        step(f"Create the OpenCheckQueue {RESOURCE_NAME} and its broker Secret")
        objects = [build_broker_secret(demo.broker), build_queue_resource(self.options, vhost)]
        apply_objects(demo, namespace, objects)
        self.cleanup.callback(self._delete_resource, api_client, namespace)
        try:
            wait_for_ready_condition(api_client, namespace, RESOURCE_NAME, READY_TIMEOUT_SECONDS)
        except DemoError as error:
            raise DemoError(f"{error}\n{operator.format_logs()}") from error
        print("Ready: the operator declared the queues and created the agent fleet.", flush=True)

    def _delete_resource(self, api_client: kubernetes.client.ApiClient, namespace: str) -> None:
        if not delete_resource(api_client, namespace, RESOURCE_NAME, DELETE_TIMEOUT_SECONDS):
            self.problems.append(
                f"OpenCheckQueue {namespace}/{RESOURCE_NAME} still exists "
                f"{DELETE_TIMEOUT_SECONDS:.0f} s after its deletion: its finalizer stayed"
            )

    def _run_workload(
        self,
        demo: DemoEnvironment,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        vhost: str,
        operator: ManagedProcess,
    ) -> Summary:
        results = ResultServer()
        results.start()
        self.cleanup.callback(results.stop)
        fleet = self._start_fleet(api_client, namespace)
        recorder = ProgressRecorder(
            broker=demo.broker,
            vhost=vhost,
            queue=QUEUE_NAME,
            dead_letter_queue=DEAD_LETTER_QUEUE_NAME,
            api_client=api_client,
            namespace=namespace,
            deployment=f"{RESOURCE_NAME}-agent",
            running_agents=fleet.running_count,
            kubectl=kubectl_command(demo.kubectl, demo.control_plane.kubeconfig),
            table_interval_seconds=self.options.table_interval_seconds,
        )

        step(f"Publish {self.options.messages} check requests")
        planned = plan_messages(self.options.messages, results.url)
        describe_plan(planned)
        recorder.start()
        self.cleanup.callback(recorder.stop)
        published_at = time.monotonic()
        recorder.set_origin(published_at)
        published = publish_messages(
            pika.URLParameters(demo.broker.amqp_url(vhost)),
            QUEUE_NAME,
            [message.body for message in planned],
        )
        print(f"Published {published} messages, each confirmed by the broker.", flush=True)

        step("Agents follow spec.replicas while the queue drains")
        drain_seconds = self._wait_for_drain(demo, vhost, results, published, published_at)
        step("Scale back down")
        self._wait_for_scale_down(api_client, namespace, fleet, recorder, operator)
        recorder.stop()
        recorder.print_table()
        fleet.stop(AGENT_STOP_GRACE_SECONDS)
        self.problems.extend(fleet.problems())

        dead_lettered = self._settled_dead_letter_count(demo, vhost)
        samples = recorder.snapshot()
        desired = [sample.desired_replicas or 0 for sample in samples]
        counts = results.snapshot()
        summary = Summary(
            published=published,
            processed=len(counts.task_ids),
            failed_commands=len(counts.failed_command_task_ids),
            dead_lettered=dead_lettered,
            expected_dead_lettered=sum(
                1 for message in planned if message.outcome is Outcome.DEAD_LETTERED
            ),
            duplicates=counts.duplicates,
            peak_replicas=max(desired, default=0),
            drain_seconds=drain_seconds,
        )
        write_plot(
            samples,
            self.options.plot_path,
            f"openchecker demo: {published} check requests, up to "
            f"{self.options.max_replicas} agents",
        )
        print(f"Wrote the plot to {self.options.plot_path}.", flush=True)
        return summary

    def _start_fleet(
        self, api_client: kubernetes.client.ApiClient, namespace: str
    ) -> LocalAgentFleet:
        fleet = LocalAgentFleet(
            api_client,
            namespace,
            deployment=f"{RESOURCE_NAME}-agent",
            config_secret=f"{RESOURCE_NAME}-agent-config",
            folder=self.folder / "agents",
        )
        print(
            "No container runtime runs pods on this machine: the agent Deployment's pods "
            "stay Pending, and local openchecker-agent processes stand in for them, one per "
            "replica.",
            flush=True,
        )
        print(f"Agent logs: {fleet.folder / 'logs'}", flush=True)
        fleet.start()
        self.cleanup.callback(fleet.stop, AGENT_STOP_GRACE_SECONDS)
        return fleet

    def _wait_for_drain(
        self,
        demo: DemoEnvironment,
        vhost: str,
        results: ResultServer,
        published: int,
        published_at: float,
    ) -> float | None:
        """Wait until every message was processed or dead-lettered, and return the seconds."""
        deadline = published_at + self.options.timeout_seconds
        parameters = pika.URLParameters(demo.broker.amqp_url(vhost))
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            while time.monotonic() < deadline:
                # A passive declare counts the dead-letter queue exactly, where
                # the management API lags by up to 5 s.
                dead_letter = channel.queue_declare(DEAD_LETTER_QUEUE_NAME, passive=True)
                settled = results.processed_count() + dead_letter.method.message_count
                if settled >= published:
                    return time.monotonic() - published_at
                connection.sleep(0.5)
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                # The summary needs no more from this connection.
                connection.close()
        self.problems.append(
            f"the queue did not drain within {self.options.timeout_seconds:.0f} s"
        )
        return None

    def _wait_for_scale_down(
        self,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        fleet: LocalAgentFleet,
        recorder: ProgressRecorder,
        operator: ManagedProcess,
    ) -> None:
        timeout = self.options.scale_down_stabilization_seconds + 60.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            latest = recorder.latest()
            if latest is not None and latest.desired_replicas == 0 and fleet.process_count() == 0:
                print("The scaler set spec.replicas to 0 and every agent exited.", flush=True)
                return
            if operator.exit_code() is not None:
                raise DemoError(f"The operator exited.\n{operator.format_logs()}")
            time.sleep(0.5)
        self.problems.append(f"the fleet did not scale down to 0 within {timeout:.0f} s")

    def _settled_dead_letter_count(self, demo: DemoEnvironment, vhost: str) -> int:
        """Return the dead-letter queue's depth from the management API.

        The management API refreshes its figures every 5 s, so this waits
        until it shows the depth that a passive declare counts exactly.
        Raises DemoError when the two still differ after
        STATISTICS_SETTLE_SECONDS.
        """
        exact = count_messages(demo, vhost, DEAD_LETTER_QUEUE_NAME)
        deadline = time.monotonic() + STATISTICS_SETTLE_SECONDS
        while True:
            figures = read_queue_figures(demo.broker, vhost, DEAD_LETTER_QUEUE_NAME)
            reported = figures.ready if figures is not None else 0
            if reported == exact:
                return reported
            if time.monotonic() > deadline:
                raise DemoError(
                    f"The management API reports {reported} dead-lettered messages, but the "
                    f"queue holds {exact}."
                )
            time.sleep(1.0)


def count_messages(demo: DemoEnvironment, vhost: str, queue: str) -> int:
    """Return the ready messages in `queue`, counted by a passive declare."""
    connection = pika.BlockingConnection(pika.URLParameters(demo.broker.amqp_url(vhost)))
    try:
        declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


def describe_plan(planned: Sequence[PlannedMessage]) -> None:
    counts: dict[str, int] = {}
    for message in planned:
        label = f"{message.reason} ({message.outcome.value})"
        counts[label] = counts.get(label, 0) + 1
    for label, count in counts.items():
        print(f"  {count:4d} {label}", flush=True)


def repository_root() -> Path:
    root = find_repository_root()
    if root is None:
        raise DemoError("The demo runs from a checkout of the repository, which has manifests/.")
    return root


def work_folder(run_name: str) -> Path:
    """Return the folder for this run's logs, kubeconfig and agent config."""
    folder = default_state_dir() / "demo" / run_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Terminated(Exception):
    """The demo received SIGTERM."""


def _raise_terminated(signal_number: int, frame: FrameType | None) -> None:
    # The exception unwinds through the cleanup stack, so the agents and the
    # operator, which run in their own sessions, are stopped too.
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)

    run_name = f"openchecker-demo-{uuid.uuid4().hex[:6]}"
    folder = work_folder(run_name)
    demo = DemoRun(options, run_name, folder)
    summary: Summary | None = None

    try:
        with demo.cleanup:
            summary = demo.run()
            step("Stop the agents and the operator; delete the demo's objects")
    except (DemoError, SetupError, PublishError) as error:
        demo.problems.append(str(error))
    except kubernetes.client.ApiException as error:
        # Setup requests run as the administrator, so any failure is unexpected.
        demo.problems.append(
            f"a Kubernetes API request failed: HTTP {error.status} {error.reason}"
        )
    except (requests.RequestException, pika.exceptions.AMQPError) as error:
        demo.problems.append(f"a request to RabbitMQ failed: {error!r}")
    except KeyboardInterrupt:
        demo.problems.append("interrupted")
    except Terminated:
        demo.problems.append("stopped by SIGTERM")

    if summary is not None:
        print("\n" + summary.format(), flush=True)
        demo.problems.extend(summary.problems())
    print(f"\nLogs of this run: {folder}", flush=True)
    if demo.problems:
        print("\nThe demo FAILED:", flush=True)
        for problem in demo.problems:
            print(f"  - {problem}", flush=True)
        return 1
    print("The demo succeeded: every message was processed or dead-lettered.", flush=True)
    return 0

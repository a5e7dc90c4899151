"""A local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

Every server listens on 127.0.0.1 only, on ports free at start time. There is
no kubelet and no scheduler, so pods are created but never run.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from .binaries import ControlPlaneBinaries
from .certs import ControlPlanePki, generate_control_plane_pki
from .errors import PortInUseError, SetupError
from .kubeconfig import write_certificate_kubeconfig, write_token_kubeconfig
from .layout import StateLayout
from .ports import LOOPBACK, reserve_free_ports
from .processes import ManagedProcess, wait_until_ready

logger = logging.getLogger(__name__)

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# The first address of the range, which kube-apiserver gives the `kubernetes`
# Service.
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# A new port set is tried when another process takes a chosen port between
# reserve_free_ports and the server's bind.
PORT_ATTEMPTS = 3
# A warm start takes a few seconds (see bench/env_up.py); this bounds a start
# on a loaded machine.
READY_TIMEOUT_SECONDS = 90.0


@dataclass(frozen=True)
class ControlPlane:
    """How to reach a running API server as an administrator.

    The same handle describes a control plane started by this process, one
    reused from `make env-up`, and a K3s container.
    """

    server: str
    kubeconfig: Path
    ca_file: Path
    client_cert_file: Path
    client_key_file: Path

    def api_session(self) -> requests.Session:
        """Return a requests session that authenticates as the administrator."""
        session = requests.Session()
        # Without this, REQUESTS_CA_BUNDLE from the environment replaces the
        # `verify` setting below, and proxy variables could route loopback
        # requests through a proxy.
        session.trust_env = False
        session.cert = (str(self.client_cert_file), str(self.client_key_file))
        session.verify = str(self.ca_file)
        return session

    def is_ready(self, timeout_seconds: float = 2.0) -> bool:
        """Return whether GET /readyz returns ok."""
        try:
            with self.api_session() as session:
                response = session.get(f"{self.server}/readyz", timeout=timeout_seconds)
        except (requests.RequestException, OSError):
            return False
        return response.status_code == 200 and response.text.strip() == "ok"

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path, *, expiration_seconds: int = 86400
    ) -> Path:
        """Write a kubeconfig that authenticates as ServiceAccount `namespace/name`.

        Creates the ServiceAccount when it does not exist and requests a
        token from the API server through the TokenRequest API, valid for
        `expiration_seconds`. The ServiceAccount gets no role here, so it is
        allowed only what RBAC objects created by the caller grant it.
        Raises SetupError when the namespace does not exist or a call fails.
        """
        accounts_url = f"{self.server}/api/v1/namespaces/{quote(namespace, safe='')}"
        accounts_url += "/serviceaccounts"
        account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
        token_request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        with self.api_session() as session:
            response = session.post(accounts_url, json=account, timeout=10)
            # 409 Conflict: it exists already, which is fine.
            if response.status_code not in (201, 409):
                raise SetupError(
                    f"Creating ServiceAccount {namespace}/{name} failed: "
                    f"HTTP {response.status_code} {response.text.strip()}"
                )
            response = session.post(
                f"{accounts_url}/{quote(name, safe='')}/token", json=token_request, timeout=10
            )
        if response.status_code != 201:
            raise SetupError(
                f"Requesting a token for ServiceAccount {namespace}/{name} failed: "
                f"HTTP {response.status_code} {response.text.strip()}"
            )
        token = str(response.json()["status"]["token"])
        return write_token_kubeconfig(path, server=self.server, ca_file=self.ca_file, token=token)

    def to_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlPlane:
        return cls(
            server=str(data["server"]),
            kubeconfig=Path(data["kubeconfig"]),
            ca_file=Path(data["ca_file"]),
            client_cert_file=Path(data["client_cert_file"]),
            client_key_file=Path(data["client_key_file"]),
        )


class LocalControlPlane:
    """Starts and stops etcd, kube-apiserver and kube-controller-manager.

    All files go under the state folder `layout.root`; the admin kubeconfig is
    written to `layout.kubeconfig` once the API server is ready.
    """

    def __init__(self, layout: StateLayout, binaries: ControlPlaneBinaries) -> None:
        self.layout = layout
        self.binaries = binaries
        self.processes: list[ManagedProcess] = []

    def start(self) -> ControlPlane:
        """Start the servers and wait until /readyz returns ok.

        Raises SetupError, after stopping whatever it started, when a server
        exits or is not ready in time.
        """
        started = time.monotonic()
        pki = generate_control_plane_pki(self.layout.pki, KUBERNETES_SERVICE_IP)
        try:
            for attempt in range(1, PORT_ATTEMPTS + 1):
                try:
                    control_plane = self._start_once(pki)
                    break
                except PortInUseError as error:
                    self.stop()
                    if attempt == PORT_ATTEMPTS:
                        raise SetupError(
                            f"The control plane failed to bind a free port {PORT_ATTEMPTS} "
                            "times in a row; another program is taking ports fast. "
                            f"The last failure:\n{error}"
                        ) from error
                    logger.warning(
                        "A control plane port was taken by another process; retrying on "
                        "other ports (attempt %d of %d).",
                        attempt + 1,
                        PORT_ATTEMPTS,
                    )
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Control plane ready at %s after %.1f s.",
            control_plane.server,
            time.monotonic() - started,
        )
        return control_plane

    def stop(self) -> None:
        """Stop the servers in reverse start order; safe to call more than once."""
        errors = []
        while self.processes:
            process = self.processes.pop()
            try:
                process.stop()
            except SetupError as error:
                errors.append(str(error))
        if errors:
            raise SetupError("\n".join(errors))

    def _start_once(self, pki: ControlPlanePki) -> ControlPlane:
        etcd_client_port, etcd_peer_port, apiserver_port = reserve_free_ports(3)
        etcd = self._start_etcd(etcd_client_port, etcd_peer_port)
        etcd_url = f"http://{LOOPBACK}:{etcd_client_port}"
        wait_until_ready(
            "etcd",
            lambda: _is_etcd_healthy(etcd_url),
            processes=[etcd],
            timeout_seconds=READY_TIMEOUT_SECONDS,
        )

        server = f"https://{LOOPBACK}:{apiserver_port}"
        apiserver = self._start_apiserver(pki, etcd_url, apiserver_port)
        # The controller manager retries until the API server responds, so both
        # start together.
        if self.binaries.kube_controller_manager is not None:
            self._start_controller_manager(pki, server, self.binaries.kube_controller_manager)
        control_plane = ControlPlane(
            server=server,
            kubeconfig=self.layout.kubeconfig,
            ca_file=pki.ca.cert_file,
            client_cert_file=pki.admin.cert_file,
            client_key_file=pki.admin.key_file,
        )
        wait_until_ready(
            f"kube-apiserver at {server}",
            control_plane.is_ready,
            processes=self.processes,
            timeout_seconds=READY_TIMEOUT_SECONDS,
            interval_seconds=0.2,
        )
        # A kube-apiserver that lost its port to another process exits, and
        # the readiness check above may have talked to that other process.
        apiserver.check_running()
        write_certificate_kubeconfig(
            self.layout.kubeconfig,
            server=server,
            ca_file=pki.ca.cert_file,
            cert_file=pki.admin.cert_file,
            key_file=pki.admin.key_file,
        )
        return control_plane

    def _launch(self, name: str, command: list[str]) -> ManagedProcess:
        process = ManagedProcess(
            name,
            command,
            log_file=self.layout.logs / f"{name}.log",
            record_folder=self.layout.pids,
            stop_grace_seconds=10.0,
        )
        self.processes.append(process)
        process.start()
        return process

    def _start_etcd(self, client_port: int, peer_port: int) -> ManagedProcess:
        # Every start begins with an empty cluster, so a crashed run leaves
        # nothing behind that could change a test's outcome.
        shutil.rmtree(self.layout.etcd_data, ignore_errors=True)
        client_url = f"http://{LOOPBACK}:{client_port}"
        peer_url = f"http://{LOOPBACK}:{peer_port}"
        return self._launch(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self.layout.etcd_data}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # Throwaway data; skipping fsync makes writes much faster.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self, pki: ControlPlanePki, etcd_url: str, port: int) -> ManagedProcess:
        command = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--secure-port={port}",
            f"--tls-cert-file={pki.serving.cert_file}",
            f"--tls-private-key-file={pki.serving.key_file}",
            f"--client-ca-file={pki.ca.cert_file}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.service_account_private_key}",
            "--allow-privileged=true",
            # The `kubernetes` Service cannot point at a loopback address, and
            # nothing inside this cluster dials it.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]
        if self.binaries.kube_controller_manager is None:
            # Without the controller manager no `default` ServiceAccount is
            # created, and this plugin would reject every pod.
            command.append("--disable-admission-plugins=ServiceAccount")
        return self._launch("kube-apiserver", command)

    def _start_controller_manager(
        self, pki: ControlPlanePki, server: str, binary: Path
    ) -> ManagedProcess:
        kubeconfig = write_certificate_kubeconfig(
            self.layout.pki / "kube-controller-manager.kubeconfig",
            server=server,
            ca_file=pki.ca.cert_file,
            cert_file=pki.controller_manager.cert_file,
            key_file=pki.controller_manager.key_file,
        )
        return self._launch(
            "kube-controller-manager",
            [
                str(binary),
                f"--kubeconfig={kubeconfig}",
                f"--bind-address={LOOPBACK}",
                # No health endpoint is needed, so it opens no port at all.
                "--secure-port=0",
                "--leader-elect=false",
                "--controllers=*",
                # Each controller acts as its own ServiceAccount with the
                # built-in RBAC roles, as in a kubeadm cluster.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.service_account_private_key}",
                f"--root-ca-file={pki.ca.cert_file}",
                f"--cluster-signing-cert-file={pki.ca.cert_file}",
                f"--cluster-signing-key-file={pki.ca.key_file}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            ],
        )


def _is_etcd_healthy(url: str) -> bool:
    try:
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(f"{url}/health", timeout=1)
    except requests.RequestException:
        return False
    return response.status_code == 200 and '"health":"true"' in response.text

"""Fatal broker errors stop the agent with exit code 3 instead of a reconnect loop."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from openchecker_testenv.broker import Broker
from support_agent import declare_work_queue, start_agent, write_agent_config

pytestmark = pytest.mark.broker

QUEUE = "checks"
EXIT_ACCESS_REFUSED = 3


@pytest.mark.timeout(60)
def test_wrong_password_exits_3(tmp_path: Path, broker: Broker, vhost: str) -> None:
    declare_work_queue(broker, vhost, QUEUE)
    wrong = f"wrong-{uuid.uuid4().hex}"
    config, name = write_agent_config(tmp_path, broker, vhost, QUEUE, password=wrong)

    agent = start_agent(config, name)

    assert agent.wait() == EXIT_ACCESS_REFUSED
    log = agent.log()
    assert "The broker refused access" in log
    assert "reconnecting" not in log
    assert wrong not in log


@pytest.mark.timeout(60)
def test_user_without_vhost_permission_exits_3(tmp_path: Path, broker: Broker, vhost: str) -> None:
    declare_work_queue(broker, vhost, QUEUE)
    username = f"agent-test-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with broker.management_session() as session:
        response = session.put(
            f"{broker.management_url}/api/users/{username}",
            json={"password": password, "tags": ""},
        )
        response.raise_for_status()
    try:
        config, name = write_agent_config(
            tmp_path, broker, vhost, QUEUE, username=username, password=password
        )

        agent = start_agent(config, name)

        assert agent.wait() == EXIT_ACCESS_REFUSED
        log = agent.log()
        assert "The broker refused access" in log
        assert password not in log
    finally:
        with broker.management_session() as session:
            session.delete(f"{broker.management_url}/api/users/{username}")

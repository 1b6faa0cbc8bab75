"""Completion hooks: their config, the webhook signature, and a running daemon that runs an exec hook
for a hostile file name, kills a hook that hangs, delivers a webhook once after two failures, and
delivers one that a crash cut short after the restart. The outbox's contract (both backends) is in
test_jobstore.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from daemon_harness import clip, final_row, rows_for, running_daemon, wait_for, whisperd_cli, write_config
from whisperd.config import ConfigError, load_config
from whisperd.hooks import hook_env, run_exec, sign, signing_key
from whisperd.rules import RuleError, RuleSet

SECRET = b"whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef")
DUMP = """
import json, os, sys
out = sys.argv[1]
env = {k: os.environb[k].hex() for k in os.environb if k.startswith(b"WHISPERD_")}
with open(os.path.join(out, os.environ["WHISPERD_DELIVERY_ID"] + ".json"), "w") as fh:
    json.dump({"env": {k.decode(): v for k, v in env.items()}, "stdin": sys.stdin.read()}, fh)
print("indexed")
"""


def test_signature_follows_standard_webhooks(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    key = signing_key(secret)
    assert key == b"0123456789abcdef0123456789abcdef"
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert sign(key, "msg_1", 1700000000, b"{}") == f"v1,{expected}"


@pytest.mark.parametrize("hook, key", [({"on": ["job.done"]}, "give either exec or webhook"),
                                       ({"exec": [], "on": ["job.done"]}, "hooks.a.exec"),
                                       ({"exec": ["/bin/true"], "on": ["job.started"]}, "hooks.a.on"),
                                       ({"webhook": {"url": "file:///etc/passwd", "secret_file": "s"},
                                         "on": ["job.done"]}, "hooks.a.webhook.url")])
def test_bad_hooks_are_config_errors(tmp_path: Path, hook: dict[str, Any], key: str) -> None:
    config = write_config(tmp_path / "c.yaml", [{"path": "in"}], tmp_path / "s", hooks={"a": hook})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(config)


def test_exec_hook_environment_and_a_timeout_that_kills_the_group(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    env = hook_env({"event": "job.failed", "audio_path": "/in/caf\udce9.wav", "error": "no speech"}, "d-1")
    assert b"NOTIFY_SOCKET" not in env and env[b"WHISPERD_AUDIO_PATH"] == b"/in/caf\xe9.wav"
    assert env[b"WHISPERD_OUTPUTS"] == b"[]" and env[b"WHISPERD_ERROR"] == b"no speech"
    marker = tmp_path / "grandchild-survived"
    script = f"sleep 3 && touch {marker} & sleep 60"  # a child in the hook's group outlives the hook
    error, _ = run_exec(["/bin/sh", "-c", script], {"event": "job.done"}, "d-2", 0.5)
    assert error is not None and "timed out" in error
    time.sleep(3.5)
    assert not marker.exists()


def test_a_rule_file_cannot_define_hooks() -> None:
    with pytest.raises((RuleError, ValueError)):
        RuleSet.model_validate({"hooks": {"x": {"exec": ["/bin/sh", "-c", "reboot"], "on": ["job.done"]}}})


class Receiver(BaseHTTPRequestHandler):
    """Fails the first two requests with 503, then accepts; keeps every request."""

    requests: list[tuple[dict[str, str], bytes, int]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        code = 503 if len(Receiver.requests) < 2 else 204
        Receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, code))
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class StallingReceiver(BaseHTTPRequestHandler):
    """Holds the first request unanswered until `release` is set (the sender is killed meanwhile),
    then accepts every request; keeps every request."""

    requests: list[tuple[dict[str, str], bytes]] = []
    arrived = threading.Event()
    release = threading.Event()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        StallingReceiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
        if len(StallingReceiver.requests) == 1:
            StallingReceiver.arrived.set()
            StallingReceiver.release.wait(120)
            return  # closed without an answer
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` on a free port of 127.0.0.1; yields the webhook URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whisperd"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.requests = []
    with serving(Receiver) as url:
        yield url


@pytest.fixture
def stalling_receiver() -> Iterator[str]:
    StallingReceiver.requests = []
    StallingReceiver.arrived, StallingReceiver.release = threading.Event(), threading.Event()
    with serving(StallingReceiver) as url:
        try:
            yield url
        finally:
            StallingReceiver.release.set()  # lets the held request's thread end


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exec_hook_hostile_name_hanging_hook_and_webhook(tmp_path: Path, receiver: str) -> None:
    inbox, dumps = tmp_path / "inbox", tmp_path / "dumps"
    inbox.mkdir()
    dumps.mkdir()
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox", "rules": {"outputs": ["txt"]}}],
                          tmp_path / "state", hooks={
                              "index": {"exec": [sys.executable, "-c", DUMP, str(dumps)], "on": ["job.done"]},
                              "hang": {"exec": [sys.executable, "-c", "import time; time.sleep(600)"],
                                       "on": ["job.done"], "timeout_seconds": 1},
                              "notify": {"webhook": {"url": receiver, "secret_file": str(secret)},
                                         "on": ["job.done"], "retry_backoff_seconds": 0.2}})
    name = b"a b $(touch PWNED) `touch PWNED2`\nnew line \xff.wav"
    hostile = Path(os.fsdecode(os.fsencode(inbox) + b"/" + name))
    second = inbox / "second.wav"
    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        shutil.copyfile(clip("en_goforward").path, hostile)
        assert final_row(tmp_path / "state", hostile).state == "done"
        shutil.copyfile(clip("en_goforward").path, second)
        assert final_row(tmp_path / "state", second).state == "done"  # while the hung hook runs or is killed

        [dump_file, _] = wait_for(lambda: len(found := sorted(dumps.iterdir())) == 2 and found, 120,
                                  "the exec hook for both files")
        dump = json.loads(dump_file.read_text())
        env = {k: bytes.fromhex(v) for k, v in dump["env"].items()}
        event = json.loads(dump["stdin"])
        assert env["WHISPERD_EVENT"] == b"job.done"
        assert env["WHISPERD_AUDIO_PATH"] == os.fsencode(hostile)  # byte-exact
        assert json.loads(env["WHISPERD_OUTPUTS"]) == [os.fsdecode(os.fsencode(hostile.with_suffix(".txt")))]
        assert env["WHISPERD_LANGUAGE"] == b"en" and 2.0 < float(env["WHISPERD_AUDIO_SECONDS"]) < 3.5
        assert env["WHISPERD_ERROR"] == b""
        assert os.fsencode(event["audio_path"]) == os.fsencode(hostile) and event["event"] == "job.done"
        assert event["delivery_id"] == env["WHISPERD_DELIVERY_ID"].decode()
        assert not list(tmp_path.rglob("PWNED*")) and not Path("/PWNED").exists()

        daemon.wait_event("hook delivery failed", 60, hook="hang")
        killed = daemon.named("hook delivery failed", hook="hang")[0]
        assert "timed out" in killed["error"]
        assert "indexed" in daemon.wait_event("hook output", 30, hook="index")["output"]

        wait_for(lambda: len(daemon.named("hook delivered", hook="notify")) == 2, 120, "both webhooks")
        status = whisperd_cli("status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        failures = json.loads(status.stdout)["hook_failures"]
        assert {f["hook"] for f in failures} == {"hang"} and len(failures) == 2
        text = whisperd_cli("status", "--config", str(config)).stdout
        assert "completion hooks that failed:" in text and "hang for" in text and "timed out" in text

    requests = Receiver.requests
    assert [code for *_, code in requests] == [503, 503, 204, 204]
    accepted = [h["webhook-id"] for h, _, code in requests if code == 204]
    assert len(set(accepted)) == 2  # each job's event delivered once, under the id it was retried with
    assert {h["webhook-id"] for h, _, _ in requests} == set(accepted)
    key = signing_key(secret)
    for headers, body, _ in requests:
        assert headers["webhook-signature"] == sign(key, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
        assert json.loads(body)["event"] == "job.done" and json.loads(body)["delivery_id"] == headers["webhook-id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_webhook_cut_short_by_a_crash_is_delivered_after_the_restart(tmp_path: Path, stalling_receiver: str) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox", "rules": {"outputs": ["txt"]}}], state,
                          hooks={"notify": {"webhook": {"url": stalling_receiver, "secret_file": str(secret)},
                                            "on": ["job.done"]}})
    audio = inbox / "talk.wav"
    with running_daemon(config, tmp_path / "run1.log") as run1:
        shutil.copyfile(clip("en_goforward").path, audio)
        wait_for(StallingReceiver.arrived.is_set, 300, "the first webhook delivery")
        assert [r.state for r in rows_for(state, audio)] == ["done"], "the event is recorded with the job"
        run1.send(signal.SIGKILL)  # while the receiver holds the delivery unanswered
        run1.wait_exit(10)
        assert not run1.named("hook delivered")
    StallingReceiver.release.set()

    with running_daemon(config, tmp_path / "run2.log") as run2:
        run2.wait_event("hook delivered", 120, hook="notify")
        assert not run2.named("job started"), "the job itself is not run again"
        status = whisperd_cli("status", "--config", str(config), "--json")
        assert json.loads(status.stdout)["hook_failures"] == []
    [(cut_headers, cut_body), (headers, body)] = StallingReceiver.requests
    assert headers["webhook-id"] == cut_headers["webhook-id"], "the same delivery id, to deduplicate on"
    assert body == cut_body
    assert headers["webhook-signature"] == sign(signing_key(secret), headers["webhook-id"],
                                                int(headers["webhook-timestamp"]), body)
    event = json.loads(body)
    assert event["event"] == "job.done" and event["audio_path"] == str(audio)
    assert event["delivery_id"] == headers["webhook-id"]

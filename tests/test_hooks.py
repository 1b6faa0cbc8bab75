"""Completion hooks: their config, the webhook signature, and a running daemon that runs an exec hook
for a hostile file name, kills a hook that hangs, and delivers a webhook once after two failures.
The outbox's contract (both backends) is in test_jobstore.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from whisperd.config import ConfigError, load_config
from whisperd.hooks import hook_env, run_exec, sign, signing_key
from whisperd.rules import RuleError, RuleSet

from daemon_harness import clip, final_row, running_daemon, wait_for, whisperd_cli, write_config

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


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whisperd"
    server.shutdown()
    server.server_close()


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

"""Importing the package changes nothing in the host: its app, its tasks, its configuration.

Each case runs in a fresh interpreter, from a directory outside the repository, as a
partner's process would: which app is current, which a partner's ``shared_task``
resolves to, and which app the package's own names send through.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.worker import host
from tests.conftest import REDIS_URL


def run_python(code: str, cwd: Path, **env: str) -> str:
    """Run ``code`` in a new interpreter in ``cwd``; its stdout (fails the test on an error)."""
    merged = {**os.environ, **env}
    merged.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=merged,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def tutorial_project(directory: Path) -> None:
    """A project laid out like Celery's tutorial: its own tasks.py and celeryconfig.py."""
    (directory / "tasks.py").write_text(
        "from celery import Celery\n"
        "app = Celery('tutorial')\n"
        "app.config_from_object('celeryconfig')\n"
        "@app.task\n"
        "def add(x, y):\n"
        "    return x + y\n"
    )
    (directory / "celeryconfig.py").write_text('task_default_queue = "tutorial"\n')


def test_import_leaves_the_partners_app_current_and_its_shared_tasks_its_own(tmp_path):
    """After `import tasks`, a partner's shared_task and the package's tasks use its app."""
    out = run_python(
        """
        from celery import Celery, shared_task, current_app

        partner = Celery("partner")
        partner.conf.broker_url = "redis://127.0.0.1:6399/3"

        @shared_task(name="partner.ping")
        def ping():
            return "pong"

        import tasks

        print(current_app.main, ping.app.main, ping.s().app.main)
        print(tasks.mint_user_tokens.app.main, tasks.mint_user_tokens.queue)
        print(tasks.mint_user_tokens.s(["u1"]).app.main)
        print(sorted(n for n in partner.tasks if n.startswith("sfox.")))
        print(tasks.app.main, "sfox.mint_user_tokens" in tasks.app.tasks)
        """,
        tmp_path,
    )
    lines = out.splitlines()
    assert lines[0] == "partner partner partner"
    assert lines[1] == "partner sfox"
    assert lines[2] == "partner"
    assert "sfox.mint_user_tokens" in lines[3] and "sfox.run_nightly_orders" in lines[3]
    assert lines[4] == "tasks True"


def test_the_package_sends_through_its_own_app_only_where_the_process_has_none(tmp_path):
    """A plain script has no app: the package's names resolve to tasks.app there."""
    out = run_python(
        """
        import celery, tasks
        print(tasks.mint_user_tokens.app is tasks.app)
        print(celery._state._tls.current_app, celery._state.default_app)
        """,
        tmp_path,
    )
    assert out.splitlines() == ["True", "None None"]


def test_a_celeryconfig_in_the_working_directory_does_not_configure_the_package(tmp_path):
    """The package's app reads its own module, never a celeryconfig found on sys.path."""
    (tmp_path / "celeryconfig.py").write_text(
        'broker_url = "redis://partner.invalid:1/0"\ntask_default_queue = "partner-queue"\n'
    )
    out = run_python(
        """
        import tasks
        print(tasks.app.conf.task_default_queue, tasks.app.conf.broker_url)
        """,
        tmp_path,
        CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
    )
    assert out == "sfox redis://127.0.0.1:6379/15"


def test_sfox_tokens_is_the_package_beside_a_projects_own_tasks_module(tmp_path):
    """A project laid out like Celery's tutorial (tasks.py, celeryconfig.py) imports sfox_tokens."""
    tutorial_project(tmp_path)
    out = run_python(
        """
        import tasks, sfox_tokens
        print(tasks.app.main, tasks.app.conf.task_default_queue, tasks.add.app.main)
        print(sfox_tokens.app.main, sfox_tokens.app.conf.task_default_queue)
        print(sfox_tokens.mint_user_tokens.app.main)
        print(sorted(n for n in tasks.app.tasks if n.startswith("sfox."))[:1])
        """,
        tmp_path,
    )
    lines = out.splitlines()
    assert lines[0] == "tutorial tutorial tutorial"
    assert lines[1] == "sfox_tokens sfox"
    assert lines[2] == "tutorial"  # the project's own app is current: its broker is used
    assert lines[3] == "['sfox.jit_done']"  # the package's tasks joined the project's app


def test_settings_come_from_the_app_then_the_environment(tmp_path):
    """sfox_* in the running app's conf (Django's CELERY_SFOX_* too) beat SFOX_* in the env."""
    out = run_python(
        """
        from celery import Celery
        import tasks
        from tasks.worker.host import settings_for

        django_like = Celery("dj")
        django_like.config_from_object(
            {"CELERY_SFOX_TOKEN_BATCH_SIZE": "7", "CELERY_BROKER_URL": "redis://h:1/2"},
            namespace="CELERY",
        )
        plain = Celery("plain")
        plain.conf.sfox_token_batch_size = 9
        for app in (django_like, plain, tasks.app):
            s = settings_for(app)
            print(app.main, s.batch_size, s.rate, s.limiter_url)
        """,
        tmp_path,
        SFOX_TOKEN_BATCH_SIZE="11",
        SFOX_RATE_LIMIT="5/1s",
        CELERY_BROKER_URL="",
        CELERY_RESULT_BACKEND="",
    )
    assert out.splitlines() == [
        "dj 7 5/1s redis://h:1/2",
        "plain 9 5/1s None",  # no broker of its own: no Redis to share a budget in
        "tasks 11 5/1s redis://localhost:6379/0",
    ]


def test_a_bad_setting_names_where_it_came_from():
    """An error about a setting says which place gave the value."""
    from celery import Celery

    from tasks._exceptions import ConfigurationError
    from tasks._settings import Settings

    app = Celery("partner", set_as_current=False)
    app.conf.sfox_token_batch_size = 0
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_conf(app.conf, {}, app_name="partner")
    assert "SFOX_TOKEN_BATCH_SIZE=0" in caught.value.message
    assert "sfox_token_batch_size in the configuration of the Celery app 'partner'" in (
        caught.value.message
    )


def test_a_missing_key_names_every_place_looked():
    """No enterprise key: the message lists the app's conf, Django's name and both env names."""
    from tasks._exceptions import ConfigurationError
    from tasks._settings import Settings

    settings = Settings.from_conf({}, {}, app_name="proj")
    with pytest.raises(ConfigurationError) as caught:
        settings.require_api_key()
    message = caught.value.message
    for place in (
        "sfox_enterprise_api_key in the configuration of the Celery app 'proj'",
        "CELERY_SFOX_ENTERPRISE_API_KEY in Django settings",
        "SFOX_ENTERPRISE_API_KEY in this process's environment",
        "ENTERPRISE_API_KEY in this process's environment",
    ):
        assert place in message


def test_no_redis_for_the_limiter_is_refused_naming_sfox_limiter_url():
    """Neither broker nor backend is Redis and no SFOX_LIMITER_URL: one clear refusal."""
    from tasks._exceptions import ConfigurationError
    from tasks._settings import Settings

    conf = {"broker_url": "amqp://guest@127.0.0.1//", "result_backend": "django-db"}
    settings = Settings.from_conf(conf, {})
    assert settings.limiter_url is None
    with pytest.raises(ConfigurationError, match="SFOX_LIMITER_URL"):
        settings.require_limiter_url()
    in_process = Settings.from_conf({**conf, "sfox_limiter_url": "memory://"}, {})
    assert in_process.require_limiter_url() == "memory://"
    with pytest.raises(ConfigurationError, match="memory://"):
        in_process.require_limiter_url(shared=True)


def test_celerys_fallback_app_is_told_from_a_partners():
    """The one private Celery state read (celery._state) still looks as calling_app expects."""
    from celery import Celery
    from celery import _state as celery_state

    assert hasattr(celery_state._tls, "current_app")
    assert hasattr(celery_state, "default_app")
    # The fallback Celery makes when asked for current_app with no app: as _get_current_app does.
    fallback = Celery("default", fixups=[], set_as_current=False)
    assert host._is_fallback(fallback)
    assert not host._is_fallback(Celery("default", set_as_current=False))
    assert not host._is_fallback(Celery("proj", set_as_current=False))


@pytest.mark.slow
def test_a_sfox_tokens_worker_in_a_tutorial_project_keeps_its_own_queue_and_settings(
    fake_sfox, redis_client, tmp_path
):
    """`celery -A sfox_tokens worker` where the project's own tasks.py and celeryconfig.py live.

    The project's tasks module is imported in the worker too (``-I tasks``); the
    worker still consumes SFOX_QUEUE alone, finds the key in the environment, and mints.
    """
    from tests.workers import Caller, WorkerProcess

    project = tmp_path / "tutorial"
    project.mkdir()
    tutorial_project(project)
    queue = "sfox-tutorial"
    worker = WorkerProcess(
        "tutorial",
        tmp_path,
        env={"SFOX_API_URL": fake_sfox.url, "SFOX_QUEUE": queue, "PYTHONPATH": str(project)},
        app="sfox_tokens",
        include="tasks",
        cwd=project,
        loglevel="INFO",
    ).start()
    caller = Caller(REDIS_URL, queue)
    try:
        result = caller.send("sfox.mint_user_tokens", args=[["tut-1", "tut-2"]]).get(timeout=60)
    finally:
        caller.close()
        worker.stop()
    assert [t["partner_user_id"] for t in result["tokens"]] == ["tut-1", "tut-2"]
    log = worker.log()
    assert f".> {queue} " in log and ".> tutorial " not in log
    assert "no sFOX enterprise key" not in log

"""Submits jobs to an INGInious backend with INGInious' own client library, as its webapp and
task tester do, and prints one JSON line per job with what INGInious returned.

Run with the python of the INGInious venv (images/inginious/build-venv.sh):

    python submit.py --backend ipc:///.../client.sock --tasks DIR --course ID TASK[:COUNT]...

Tasks are loaded by INGInious' course and task factories from DIR/ID/TASK/task.yaml. Before the
first job it waits until the backend announces the tasks' environment (an agent has come up and
found a runtime for it). Jobs run one after the other, so each one's wall time (submission to
result, measured here) is its own. Exits 0 when every job got a result, 1 otherwise; every wait
is bounded.
"""
import argparse
import json
import logging
import os
import sys
import threading
import time

from inginious.client.client import Client
from inginious.common.filesystems.local import LocalFSProvider
from inginious.common.tasks_problems import get_default_problem_types
from inginious.frontend.arch_helper import start_asyncio_and_zmq
from inginious.frontend.course_factory import create_factories
from inginious.frontend.environment_types import register_base_env_types
from inginious.frontend.task_dispensers.toc import TableOfContents


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True, help="the backend's client address")
    ap.add_argument("--tasks", required=True, help="the tasks directory (as the agent's --tasks)")
    ap.add_argument("--course", required=True)
    ap.add_argument("--env-timeout", type=float, default=120, help="seconds to wait for the environment")
    ap.add_argument("--job-timeout", type=float, default=300, help="seconds to wait for each result")
    ap.add_argument("jobs", nargs="+", help="TASK or TASK:COUNT")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="submit: %(asctime)s %(name)s %(levelname)s %(message)s")

    register_base_env_types()
    fs = LocalFSProvider(args.tasks)
    course_factory, _ = create_factories(fs, {TableOfContents.get_id(): TableOfContents},
                                         get_default_problem_types())
    course = course_factory.get_course(args.course)
    jobs = []
    for spec in args.jobs:
        task_id, _, count = spec.partition(":")
        jobs += [course.get_task(task_id)] * int(count or 1)

    context, _thread = start_asyncio_and_zmq()
    client = Client(context, args.backend)
    client.start()

    # The backend announces environments once an agent has registered them.
    wanted = {(t.get_environment_type(), t.get_environment_id()) for t in jobs}
    deadline = time.monotonic() + args.env_timeout
    while True:
        envs = client.get_available_environments()
        missing = [e for e in wanted if e[1] not in envs.get(e[0], [])]
        if not missing:
            break
        if time.monotonic() > deadline:
            emit({"error": "environments never announced", "missing": missing, "available": envs})
            return 1
        time.sleep(0.2)
    emit({"environments": {k: list(v) for k, v in envs.items()}})

    failed = False
    for task in jobs:
        done = threading.Event()
        out = {}

        def callback(result, grade, problems, tests, custom, state, archive, stdout, stderr, out=out, done=done):
            out.update(t_done=time.time(), result=result[0], text=result[1], grade=grade, problems=problems,
                       tests=tests, custom=custom, state=state, archive_bytes=len(archive or b""),
                       stdout=stdout, stderr=stderr)
            done.set()

        t_submit = time.time()
        # debug=True, as INGInious' task tester submits: stdout and stderr of the grading script
        # come back with the result.
        job_id = client.new_job(0, task, {"answer": "rootcell", "@username": "student", "@lang": "en"},
                                callback, launcher_name="rootcell-e2e", debug=True)
        if not done.wait(args.job_timeout):
            if job_id is not None:
                client.kill_job(job_id)
            emit({"task": task.get_id(), "job_id": job_id, "result": "client-timeout", "t_submit": t_submit,
                  "wall": time.time() - t_submit})
            failed = True
            continue
        out.update(task=task.get_id(), job_id=job_id, t_submit=t_submit, wall=out["t_done"] - t_submit)
        emit(out)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # The client's event loop runs in a daemon thread that never returns by itself.
    os._exit(code)

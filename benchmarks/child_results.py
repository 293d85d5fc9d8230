"""What benchmark processes report: result lines of child processes, and the code's git commit.

A benchmark driver runs each case in a child process (fresh memory statistics, concurrent
compiles); the child prints its result as one `RESULT {json}` line on stdout, among its other
output, and the driver picks those lines out.
"""

import functools
import json
import os
import pathlib
import subprocess

RESULT_TAG = "RESULT "
REPO = pathlib.Path(__file__).resolve().parents[1]


def print_result(result: dict) -> None:
    """Prints `result` as a RESULT line (flushed: the parent may be waiting on it)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def common_setting(docs: list[dict], field: str):
    """The value of `field` in every one of the result documents `docs` (for merging runs).

    Raises:
      ValueError: naming the values, if the documents differ in it.
    """
    values = {json.dumps(d.get(field)) for d in docs}
    if len(values) > 1:
        raise ValueError(f"the merged results differ in {field}: {sorted(values)}")
    return docs[0].get(field)


def parse_results(stdout: str) -> list[dict]:
    """The RESULT lines' objects of a child's stdout, in order."""
    return [
        json.loads(line[len(RESULT_TAG) :])
        for line in stdout.splitlines()
        if line.startswith(RESULT_TAG)
    ]


def log_lines(stdout: str) -> list[str]:
    """The other lines of a child's stdout (its own progress output)."""
    return [line for line in stdout.splitlines() if not line.startswith(RESULT_TAG)]


@functools.cache  # drivers record it with every partial write
def git_sha() -> str:
    """HEAD of the repository, with "-dirty" if the working tree differs from it; $GIT_SHA if set
    (for copies whose git metadata is not that of the code); "unknown" without git."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

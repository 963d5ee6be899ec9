"""The Python session of one section of a document, for tests/test_docs.py.

Run as a script in the section's directory and environment. It reads
requests, one JSON object per line, from its stdin: ``{"file": PATH,
"line": N, "source": CODE}``, executes each CODE in one namespace (a
doctest-like session, as a module run as ``__main__``), compiled so that a
traceback names the document and its line, and answers on its stdout one
JSON line per request: ``{"ok": true}`` or ``{"ok": false, "error":
TRACEBACK}``. The examples' own output, and that of any process they start,
goes to stderr (fds 1 and 2 both), never into the answers. It exits at the
end of its stdin.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import traceback


def main() -> None:
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # an example that reads stdin reads nothing
    os.dup2(2, 1)  # print() goes to the log, not into the answers
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - for the session's life
    namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": builtins}
    for line in requests:
        request = json.loads(line)
        try:
            # Pad with newlines so that line numbers are the document's.
            code = compile("\n" * request["line"] + request["source"], request["file"], "exec")
            exec(code, namespace)
        except BaseException:
            answer = {"ok": False, "error": traceback.format_exc()}
        else:
            answer = {"ok": True}
        sys.stdout.flush()
        sys.stderr.flush()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()

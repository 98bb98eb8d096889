"""The exit codes of ``meshctl``, in one place (the README's "Exit codes" lists them).

Every command keeps to these four; tests/unit/test_exitcodes.py checks that no command in
:mod:`mesh.cli` exits with another literal code.

* ``OK`` (0): done; a check found nothing wrong.
* ``NOT_OK`` (1): the command ran but the answer is no: a check found problems (``schema
  check`` breaking changes, ``agent health`` not healthy, ``capture status`` out of date), a
  request was refused or not carried out by every agent, nothing matched (``agent uninstall`` of
  an agent not installed), or the operator declined a confirmation. Retrying changes nothing
  until something else changes.
* ``BAD_INPUT`` (2): the command could not run: a bad config file or option (with the file and
  field path), a file that cannot be read or written, a broker or control plane that cannot be
  reached, a broken adapter plugin. Click's own usage errors are 2 as well.
* ``INTERRUPTED`` (130): stopped by Ctrl-C (SIGINT), the shell convention 128 + 2.
"""

from __future__ import annotations

__all__ = ["BAD_INPUT", "CODES", "INTERRUPTED", "NOT_OK", "OK"]

OK = 0
NOT_OK = 1
BAD_INPUT = 2
INTERRUPTED = 130

CODES: dict[int, str] = {
    OK: "done; a check found nothing wrong",
    NOT_OK: "ran, but the answer is no: problems found, refused, not carried out everywhere, "
    "nothing matched, or a confirmation declined",
    BAD_INPUT: "could not run: bad config or option, unreadable file, broker or control plane "
    "unreachable, broken plugin (one line on stderr says what and where)",
    INTERRUPTED: "stopped by Ctrl-C",
}
"""Code -> what it means (for the README table and the test)."""

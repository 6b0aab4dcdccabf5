"""UTC timestamps as text, quickly: the logs and the tracking index write two or three per message, and
``datetime.isoformat`` costs a microsecond or two each, where most of the text is the same second as the time
before."""

from __future__ import annotations

import datetime as dt


class SecondText:
    """``YYYY-MM-DD<sep>HH:MM:SS`` of a naive or UTC datetime's whole second, keeping the last second's text. Safe
    across threads: the second and its text are one tuple, replaced at once."""

    __slots__ = ("_sep", "_last")

    def __init__(self, sep: str) -> None:
        self._sep = sep
        self._last: tuple[tuple[int, ...], str] = ((), "")

    def __call__(self, ts: dt.datetime) -> str:
        key = (ts.second, ts.minute, ts.hour, ts.day, ts.month, ts.year)
        last = self._last
        if last[0] == key:
            return last[1]
        text = ts.replace(microsecond=0, tzinfo=None).isoformat(self._sep)
        self._last = (key, text)
        return text

"""The compiled parts of mailgate, both optional: where one can't be built, mailgate runs without it.
- smtp/_speedups.c, the per-byte work of the message path; its pure-Python twin is smtp/bodyscan.py.
- queue/_syncer.c, the thread that syncs the queue's files without the GIL; without it the queue commits on a
  thread of its own (queue/store.py)."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("mailgate.smtp._speedups", ["src/mailgate/smtp/_speedups.c"], optional=True),
    Extension("mailgate.queue._syncer", ["src/mailgate/queue/_syncer.c"], optional=True),
])

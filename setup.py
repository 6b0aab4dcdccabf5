"""The one compiled part of mailgate: smtp/_speedups.c (the per-byte work of the message path). It is optional:
where it can't be built, mailgate runs its pure-Python twin (smtp/bodyscan.py) with the same results."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mailgate.smtp._speedups", ["src/mailgate/smtp/_speedups.c"], optional=True)])

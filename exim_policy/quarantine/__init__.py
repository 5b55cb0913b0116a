"""The quarantine: held outbound spam with its real envelope and evidence.

``receiver`` (the SMTP server Exim's quarantine transport delivers to), ``store`` (files
and the SQLite index: states, audit, purge), ``release`` (to the original recipients,
unscanned, once), ``importer`` (mailboxes of the redirect recipe), ``evidence`` and
``headers`` (what the DATA ACL's fields say, and leaving them out of the stored copy).
"""

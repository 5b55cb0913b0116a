"""exim-policy: outbound- and forwarding-spam policy for Exim + Rspamd."""

__version__ = "0.1.0"

"""dvs-agent: keeps a fresh OSIGU/DVS OAuth2 access token where local services can read it."""

__version__ = "0.1.0"

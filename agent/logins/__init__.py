"""The built-in Vault login methods (``auth_method``, DESIGN §12): one module per method, each a
:class:`~agent.plugin.LoginKind` named in :data:`agent.registry.BUILTIN_LOGINS`."""

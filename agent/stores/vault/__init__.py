"""Vault (or OpenBao): one authenticated connection shared by the Vault source and sink.

``settings`` (where Vault is, how to log in), ``logins`` (one function per login method),
``errors`` (hvac and requests failures → agent errors, masked), ``connection`` (the client,
its token's renewal, the 403 re-login, the poll's bounded GET). Import the submodules; this
package imports nothing, so ``agent.stores.vault.settings`` stays free of hvac.
"""

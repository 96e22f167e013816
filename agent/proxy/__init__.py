"""The local bearer proxy (DESIGN §14): consumers that cannot read a token file send their
requests to a unix socket (or a loopback port) and the agent forwards them upstream with the
profile's current token. :mod:`agent.proxy.settings` is its config (no HTTP stack imported);
:mod:`agent.proxy.service` runs it on asyncio with httptools (the llhttp parser), imported
only when a profile has a proxy."""

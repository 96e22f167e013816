"""Fleet mode (DESIGN §13): the agents of one OSIGU client share one token through a store that
ops already run, and exactly one of them asks the auth server.

- :mod:`agent.fleet.keys`: the fleet key and the signatures of every shared entry;
- :mod:`agent.fleet.coordinator`: adoption, the mint lease, newest-wins publish, markers;
- :mod:`agent.fleet.redis` (and its store, :mod:`agent.fleet.redis_store`): the Redis plug-in.
"""

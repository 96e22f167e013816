"""The SQS rotation trigger: AWS Secrets Manager's events, long-polled (DESIGN §5, §11).

A profile that reads the ``aws`` source and sets ``events_queue_url`` in ``[profiles.NAME.aws]``
is woken when an event names its secret. One listener runs per distinct queue (and region),
shared by the profiles that name it; with ``role_arn`` it reads the queue as that role (as
the first profile's identity, role or none, when profiles on one queue differ: a warning
says so).
The listener, which imports boto3, is :class:`agent.stores.aws.events.SqsRotationListener`,
imported only when a profile asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from agent.config.schema import ProfileConfig
from agent.plugin import RotationListener, TriggerKind, Where
from agent.sources.aws import AssumedRole, AwsSourceConfig, assumed_role


class SqsTrigger(TriggerKind):
    name = "sqs"

    def listeners(
        self,
        profiles: Mapping[str, ProfileConfig],
        on_rotation: Callable[[str, str], None],
        logger: logging.Logger,
    ) -> list[RotationListener]:
        watched: dict[tuple[str, str | None], dict[str, list[str]]] = {}
        #: the identity each queue is read as: the first profile's that names it (its role,
        #: or None: the agent's own credentials)
        roles: dict[tuple[str, str | None], tuple[str, AssumedRole | None]] = {}
        for name, pc in profiles.items():
            aws = pc.table("aws")
            if not isinstance(aws, AwsSourceConfig) or "aws" not in pc.sources:
                continue
            if not aws.events_queue_url or aws.secret_id is None:
                continue
            # the queue's own URL gives the SQS endpoint: a Secrets Manager VPC endpoint
            # (aws.endpoint_url) cannot answer SQS calls
            queue = (aws.events_queue_url, aws.region)
            watched.setdefault(queue, {})[name] = [aws.secret_id]
            role = assumed_role(aws, Where.of(name, ["aws"]))
            first = roles.setdefault(queue, (name, role))
            if _identity(first[1]) != _identity(role):
                logger.warning(
                    "profiles %s and %s read the events queue %s as different identities; "
                    "one listener reads a queue (each message is taken once), as %s's: %s. "
                    "Allow that identity sqs:ReceiveMessage and sqs:DeleteMessage, or give "
                    "each identity its own queue",
                    first[0],
                    name,
                    aws.events_queue_url,
                    first[0],
                    f"the role {first[1].arn}" if first[1] else "the agent's own credentials",
                    extra={"event": "events_role_mismatch"},
                )
        if not watched:
            return []
        from agent.stores.aws.events import SqsRotationListener

        return [
            SqsRotationListener(
                queue_url=queue[0],
                region=queue[1],
                endpoint_url=None,  # the queue URL's own endpoint
                watch=watch,
                on_rotation=on_rotation,
                role=roles[queue][1],
                logger=logger,
            )
            for queue, watch in watched.items()
        ]


def _identity(role: AssumedRole | None) -> tuple[str, str | None] | None:
    """What decides who a queue is read as: the role and its external id (None: no role)."""
    return (role.arn, role.external_id) if role is not None else None


KIND = SqsTrigger()

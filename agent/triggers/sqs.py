"""The SQS rotation trigger: AWS Secrets Manager's events, long-polled (DESIGN §5, §11).

A profile that reads the ``aws`` source and sets ``events_queue_url`` in ``[profiles.NAME.aws]``
is woken when an event names its secret. One listener runs per distinct queue (and region),
shared by the profiles that name it. The listener, which imports boto3, is
:class:`agent.stores.aws.events.SqsRotationListener`, imported only when a profile asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from agent.config.schema import ProfileConfig
from agent.plugin import RotationListener, TriggerKind
from agent.sources.aws import AwsSourceConfig


class SqsTrigger(TriggerKind):
    name = "sqs"

    def listeners(
        self,
        profiles: Mapping[str, ProfileConfig],
        on_rotation: Callable[[str, str], None],
        logger: logging.Logger,
    ) -> list[RotationListener]:
        watched: dict[tuple[str, str | None], dict[str, list[str]]] = {}
        for name, pc in profiles.items():
            aws = pc.table("aws")
            if not isinstance(aws, AwsSourceConfig) or "aws" not in pc.sources:
                continue
            if not aws.events_queue_url or aws.secret_id is None:
                continue
            # the queue's own URL gives the SQS endpoint: a Secrets Manager VPC endpoint
            # (aws.endpoint_url) cannot answer SQS calls
            watched.setdefault((aws.events_queue_url, aws.region), {})[name] = [aws.secret_id]
        if not watched:
            return []
        from agent.stores.aws.events import SqsRotationListener

        return [
            SqsRotationListener(
                queue_url=queue_url,
                region=region,
                endpoint_url=None,  # the queue URL's own endpoint
                watch=watch,
                on_rotation=on_rotation,
                logger=logger,
            )
            for (queue_url, region), watch in watched.items()
        ]


KIND = SqsTrigger()

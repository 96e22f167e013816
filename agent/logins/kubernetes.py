"""``auth_method = "kubernetes"``: log in with the pod's service-account token (DESIGN §12).

The token file (default :data:`SERVICE_ACCOUNT_TOKEN`) is read again at every login: the
kubelet rotates projected tokens. Vault asks the Kubernetes API (TokenReview) whether the token
is valid and binds the service account and namespace to the role ``role``.
"""

from __future__ import annotations

from typing import Any

from agent.logins.common import mount_key
from agent.logins.jwt import JwtLogin
from agent.plugin import LoginContext

#: where the kubelet mounts the pod's service-account token
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105


class KubernetesLogin(JwtLogin):
    name = "kubernetes"
    holder = "Kubernetes auth role"
    label = "Kubernetes"
    default_jwt_file = SERVICE_ACCOUNT_TOKEN

    def post(self, ctx: LoginContext, role: str, jwt: str, mount: str) -> Any:
        return ctx.client.auth.kubernetes.login(
            role=role, jwt=jwt, mount_point=mount, use_token=False
        )

    def fix(self, config: Any, ctx: LoginContext, path: str) -> str:
        key = ctx.config_key
        return (
            f"check that the service account of the token in {path} ({key}.jwt_file) and its "
            f"namespace are bound to the role {config.role!r} ({key}.role: "
            "bound_service_account_names, bound_service_account_namespaces) at "
            f"auth/{self.mount(config)} ({key}.{mount_key(config)}), that the token is "
            "current (the kubelet rewrites it), and that Vault's kubernetes config reaches the "
            "API server's TokenReview"
        )


KIND = KubernetesLogin()

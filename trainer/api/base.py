"""Shared pieces of the API: wire conventions, common types, CEL helpers and errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "difftrain.dev"

# Exit codes of the trainer's commands that the operator's pod failure policy tells apart.
EXIT_CONFIG_ERROR = 3  # the spec cannot work (incompatible inputs, missing model): no retry helps
EXIT_INTERRUPTED = 75  # SIGTERM handled and the work saved: not a failure, uses no retry
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes resource quantity ("4", "500m", "32Gi"), as apimachinery parses it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# An object-store URI (s3://bucket/prefix) or a local path (no other URL scheme).
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[^:]+)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Uri = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=URI_PATTERN,
        description="s3://bucket/prefix in the object store, or a local path for local runs.",
    ),
]
Quantity = Annotated[int | str, Field(json_schema_extra={"pattern": QUANTITY_PATTERN})]
ShortText = Annotated[str, Field(max_length=253)]
Prompt = Annotated[str, Field(min_length=1, max_length=2048)]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def rules(*entries: dict[str, str]) -> ConfigDict:
    """Model config carrying CEL rules into the generated CRD."""
    validations: list[JsonValue] = [dict(e) for e in entries]
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


class APIModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def section(model: type[BaseModel], description: str) -> Any:
    """A nested block that is always present: defaulted to ``{}`` so its own defaults apply."""
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


class SecretKeyRefs(APIModel):
    """A Secret holding the object-store credentials."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_LABEL_PATTERN)] = Field(
        description="Name of the Secret, in the resource's namespace."
    )
    access_key_key: ShortText = Field(
        default="accessKey", description="Key of the access key in the Secret."
    )
    secret_key_key: ShortText = Field(
        default="secretKey", description="Key of the secret key in the Secret."
    )


class SecretKeyRef(APIModel):
    """One key of a Secret."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_LABEL_PATTERN)] = Field(
        description="Name of the Secret, in the resource's namespace."
    )
    key: ShortText = Field(default="token", description="Key holding the value.")


class ConfigMapKeyRef(APIModel):
    """A key of a ConfigMap."""

    name: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        description="Name of the ConfigMap, in the resource's namespace."
    )
    key: ShortText = Field(default="ca.crt", description="Key holding the PEM bundle.")


class StorageSpec(APIModel):
    """The S3-compatible object store (MinIO or any other)."""

    endpoint: Annotated[str, Field(min_length=1, max_length=1024)] = Field(
        description="host:port of the store, e.g. 'minio.storage.svc:9000'."
    )
    secret_ref: SecretKeyRefs | None = Field(
        default=None,
        description="Secret with the access and secret key. Credentials never appear in a "
        "spec; unset means anonymous access.",
    )
    secure: bool = Field(default=True, description="Use TLS.")
    region: ShortText | None = Field(default=None, description="Region, if the store needs one.")
    ca_bundle: ConfigMapKeyRef | None = Field(
        default=None, description="ConfigMap key with a PEM CA bundle for a private CA."
    )


class Condition(APIModel):
    """A standard condition (the metav1.Condition shape)."""

    type: Annotated[str, Field(min_length=1, max_length=316)] = Field(
        description="Condition type: Ready, Running, Succeeded, Failed, Suspended, ..."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(max_length=1024)] = Field(
        default="", description="CamelCase reason for the last transition."
    )
    message: Annotated[str, Field(max_length=32768)] = Field(
        default="", description="Human-readable details."
    )
    last_transition_time: str | None = Field(
        default=None,
        description="When status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was set for."
    )


def conditions_field() -> Any:
    """The ``conditions`` list of a status: standard conditions, a list-map keyed by type."""
    return Field(
        default_factory=list,
        max_length=16,
        description="Standard conditions.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


class ObjectMeta(BaseModel):
    """The part of metadata the API reads; the rest is kept as it is."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class SpecError(ValueError):
    """A resource that does not validate; the message names each field and what is wrong."""

    def __init__(self, kind: str, errors: list[str]) -> None:
        self.kind = kind
        self.errors = errors
        super().__init__(f"invalid {kind}:\n" + "\n".join(f"  {e}" for e in errors))


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")) or "[" in part:
            continue  # pydantic's internal validator names, not fields
        else:
            path += f".{part}" if path else part
    return path or "(root)"


def format_validation_error(exc: ValidationError) -> list[str]:
    """Turn a pydantic error into 'field.path: what is wrong' lines, camelCase as on the wire."""
    lines = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and indentation)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif (
            err["type"] == "string_pattern_mismatch"
            and err.get("ctx", {}).get("pattern") == URI_PATTERN
        ):
            msg = (
                f"{err['input']!r} is neither s3://bucket/prefix (bucket names: 3-63 lowercase "
                "letters, digits, dots and dashes) nor a local path"
            )
        lines.append(f"{_field_path(tuple(err['loc']))}: {msg}")
    return lines

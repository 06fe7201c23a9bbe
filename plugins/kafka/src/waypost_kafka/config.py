"""Settings of the ``kafka`` sink, and the librdkafka configuration they make.

The producer is always idempotent with ``acks=all``: a setting under ``producer:`` that would
break that (or that has a key of its own here) is refused with the key to use instead.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from waypost.sinks import SinkConfig, is_loopback_host

__all__ = ["KafkaConfig", "topic_fields"]

TOPIC_FIELDS = ("app", "name")
_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_TOPIC_MAX = 249  # Kafka's limit on a topic name
# producer: settings that concern the connection, which a consumer of the topic needs as well.
_CONNECTION_PREFIXES = ("sasl.", "ssl.", "socket.", "broker.", "client.", "https.", "enable.ssl")

# librdkafka properties that this config sets from keys of its own.
_OWN_KEYS = {
    "bootstrap.servers": "bootstrap_servers",
    "metadata.broker.list": "bootstrap_servers",
    "compression.type": "compression",
    "compression.codec": "compression",
    "message.timeout.ms": "timeout (seconds)",
    "delivery.timeout.ms": "timeout (seconds)",
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_ca_location",
    "ssl.certificate.location": "ssl_certificate_location",
    "ssl.key.location": "ssl_key_location",
    "ssl.key.password": "ssl_key_password",
    "client.id": "client_id",
}
# Settings that would void the delivery guarantees, with the reason.
_ACKS = "acks is always all: an event is delivered once every in-sync replica has it"
_REFUSED = {
    "transactional.id": "transactions are not used: delivery reports confirm each event",
    "enable.idempotence": "the producer is always idempotent (no duplicates, order kept)",
    "acks": _ACKS,
    "request.required.acks": _ACKS,
    "delivery.report.only.error": "every delivery report is needed to mark events delivered",
    "dr_cb": "the sink reads the delivery reports itself",
    "dr_msg_cb": "the sink reads the delivery reports itself",
    "on_delivery": "the sink reads the delivery reports itself",
    "error_cb": "the sink handles producer errors itself",
    "logger": "the sink routes librdkafka's log through logging, secrets masked",
    "stats_cb": "callbacks cannot be set from config",
    "throttle_cb": "callbacks cannot be set from config",
    "oauth_cb": "callbacks cannot be set from config",
}
# Properties whose value is a secret: they belong in producer_secrets (never logged).
_SECRET_PARTS = ("password", "secret", "ssl.key.pem", "ssl_key", "sasl.oauthbearer.config")


def topic_fields(template: str) -> set[str]:
    """The ``{field}`` names in a topic template (``telemetry.{app}``)."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def topic_name(text: str) -> str:
    """A legal Kafka topic name: characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    return _TOPIC_CHARS.sub("_", text)[:_TOPIC_MAX]


class KafkaConfig(SinkConfig):
    """Settings of a ``kafka`` sink. Passwords and other secrets are ``SecretStr``."""

    model_config = ConfigDict(hide_input_in_errors=True)

    bootstrap_servers: list[str] = Field(
        description="Brokers to start from, host:port (a list, or one comma-separated string)."
    )
    topic: str = Field(
        default="telemetry.{app}",
        description="Topic, or a template with {app} and {name} (the event name).",
    )
    key: Literal["instance_id", "distinct_id", "none"] = Field(
        default="instance_id",
        description="Message key: events with one key go to one partition, in order.",
    )
    format: Literal["json", "cloudevents"] = Field(
        default="json", description="Value: the waypost envelope as JSON, or a CloudEvent."
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="lz4", description="Compression of the producer's batches."
    )
    acks: Literal["all"] = Field(
        default="all", description="Always all: the only value that keeps every event."
    )
    client_id: str | None = Field(default=None, description="Client id; default waypost-<app>.")
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] | None = Field(
        default=None,
        description="Default: sasl_ssl with a SASL user, ssl with SSL settings, else plaintext.",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="Allow an unencrypted protocol to brokers that are not on loopback.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = Field(
        default="PLAIN", description="SASL mechanism."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_ca_location: str | None = Field(default=None, description="CA certificate file.")
    ssl_certificate_location: str | None = Field(
        default=None, description="Client certificate file (mutual TLS)."
    )
    ssl_key_location: str | None = Field(default=None, description="Client key file.")
    ssl_key_password: SecretStr | None = Field(default=None, description="Client key password.")
    cloudevents_source: str | None = Field(
        default=None, description="CloudEvents source attribute; default /waypost/<app>."
    )
    cloudevents_type_prefix: str = Field(
        default="waypost.", description="CloudEvents type is this prefix + the event name."
    )
    producer: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Further librdkafka producer settings, e.g. linger.ms (see the README).",
    )
    producer_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="librdkafka settings whose values are secrets (never logged).",
    )

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [
                part.strip()
                for item in value
                for part in (item.split(",") if isinstance(item, str) else [item])
                if not isinstance(part, str) or part.strip()
            ]
            if not value:
                raise ValueError("name at least one broker, host:port")
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        for server in value:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"broker {server!r} is not host:port")
        return value

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        try:
            fields = topic_fields(value)
        except ValueError as exc:
            raise ValueError(f"topic template {value!r} is malformed: {exc}") from None
        unknown = sorted(fields - set(TOPIC_FIELDS))
        if unknown:
            raise ValueError(
                f"topic template {value!r} names {', '.join(unknown)}; it may use {{app}} "
                "and {name} only"
            )
        if not fields and (topic_name(value) != value or value in (".", "..")):
            raise ValueError(
                f"topic {value!r} is not a legal Kafka topic name (letters, digits, '.', '_', "
                f"'-', at most {_TOPIC_MAX})"
            )
        return value

    @field_validator("producer")
    @classmethod
    def _check_producer(
        cls, value: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        for key, setting in value.items():
            name = key.strip().lower()
            if name in _OWN_KEYS:
                raise ValueError(f"producer.{key}: set {_OWN_KEYS[name]} instead")
            if name in _REFUSED:
                raise ValueError(f"producer.{key} cannot be set: {_REFUSED[name]}")
            if any(part in name for part in _SECRET_PARTS):
                raise ValueError(
                    f"producer.{key} holds a secret: put it under producer_secrets, which is "
                    "never logged"
                )
            text = str(setting).strip().lower()
            if name in ("retries", "message.send.max.retries") and text in ("0", "false"):
                raise ValueError(
                    f"producer.{key}: 0 would drop events on the first broker error; the "
                    "idempotent producer needs retries"
                )
            in_flight = name == "max.in.flight.requests.per.connection"
            if in_flight and text.isdigit() and int(text) > 5:
                raise ValueError(
                    f"producer.{key}: at most 5 keeps the idempotent producer in order"
                )
        return value

    @field_validator("producer_secrets")
    @classmethod
    def _check_secrets(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key in value:
            name = key.strip().lower()
            if name in _OWN_KEYS:
                raise ValueError(f"producer_secrets.{key}: set {_OWN_KEYS[name]} instead")
            if name in _REFUSED:
                raise ValueError(f"producer_secrets.{key} cannot be set: {_REFUSED[name]}")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaConfig:
        protocol = self.protocol
        password_login = protocol.startswith("sasl") and self.sasl_mechanism != "OAUTHBEARER"
        if password_login and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(
                f"security_protocol {protocol} with {self.sasl_mechanism} needs "
                "sasl_username and sasl_password"
            )
        if self.sasl_username and not protocol.startswith("sasl"):
            raise ValueError(
                f"sasl_username is set but security_protocol is {protocol}: use sasl_ssl"
            )
        if protocol in ("plaintext", "sasl_plaintext") and not self.allow_plaintext:
            remote = [s for s in self.bootstrap_servers if not _loopback(s)]
            if remote:
                raise ValueError(
                    f"security_protocol {protocol} sends events (and any password) unencrypted "
                    f"to {', '.join(remote)}; use ssl or sasl_ssl, or set allow_plaintext: true "
                    "if the network is trusted"
                )
        return self

    @property
    def protocol(self) -> str:
        """The security protocol in effect (the explicit one, or the one the settings imply)."""
        if self.security_protocol:
            return self.security_protocol
        if self.sasl_username or (self.sasl_mechanism == "OAUTHBEARER" and self._oauth_set):
            return "sasl_ssl"
        if self.ssl_ca_location or self.ssl_certificate_location or self.ssl_key_location:
            return "ssl"
        return "plaintext"

    @property
    def _oauth_set(self) -> bool:
        return any(
            k.startswith("sasl.oauthbearer") for k in (*self.producer, *self.producer_secrets)
        )

    def subscription(self) -> list[str]:
        """What a consumer subscribes to: the topic, or for a template a regular expression
        (librdkafka's ``^`` form) that matches every topic it can make."""
        if not topic_fields(self.topic):
            return [self.topic]
        parts = []
        for literal, field, _, _ in string.Formatter().parse(self.topic):
            parts.append(re.escape(topic_name(literal)))
            if field is not None:
                parts.append("[A-Za-z0-9._-]+")
        return ["^" + "".join(parts) + "$"]

    def secrets(self) -> list[str]:
        """Every secret value of this config (to mask them in librdkafka's messages)."""
        found = [s.get_secret_value() for s in (self.sasl_password, self.ssl_key_password) if s]
        found += [s.get_secret_value() for s in self.producer_secrets.values()]
        return [s for s in found if s]

    def connection(self, app: str) -> dict[str, Any]:
        """librdkafka settings to reach the brokers (servers, security, SASL, SSL, and the
        connection settings under ``producer``), for a producer or a consumer of the topic.
        Secrets included: hand it to librdkafka only."""
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(self.bootstrap_servers),
            "client.id": self.client_id or f"waypost-{app}",
            "security.protocol": self.protocol,
            # Errors reach the sink through the delivery reports and error_cb; librdkafka's own
            # log keeps to critical lines unless the operator asks for more (log_level, debug).
            "log_level": 2,
            "log.connection.close": False,
        }
        if self.protocol.startswith("sasl"):
            conf["sasl.mechanism"] = self.sasl_mechanism
            if self.sasl_username:
                conf["sasl.username"] = self.sasl_username
            if self.sasl_password is not None:
                conf["sasl.password"] = self.sasl_password.get_secret_value()
        optional = {
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value()
            if self.ssl_key_password
            else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        for key, value in self.producer.items():
            if key.strip().startswith(_CONNECTION_PREFIXES):
                conf[key.strip()] = _setting(value)
        for key, secret in self.producer_secrets.items():
            conf[key.strip()] = secret.get_secret_value()
        return conf

    def librdkafka(self, app: str) -> dict[str, Any]:
        """The producer configuration (secrets included: hand it to librdkafka only)."""
        conf: dict[str, Any] = {
            **self.connection(app),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": self.compression,
            # librdkafka gives up on a message at the sink's timeout: its delivery report then
            # says so, and the core retries the event later.
            "message.timeout.ms": max(1, int(self.timeout * 1000)),
        }
        for key, value in self.producer.items():
            conf[key.strip()] = _setting(value)
        return conf


def _setting(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _loopback(server: str) -> bool:
    host = server.rpartition(":")[0]
    return is_loopback_host(host)

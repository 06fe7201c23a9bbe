"""waypost-ga4: a waypost sink for Google Analytics 4, through the Measurement Protocol.

Configured as ``type: ga4`` with ``measurement_id`` (web stream) or ``firebase_app_id`` (app
stream) and ``api_secret``; see the README for what is sent and how GA4's limits are kept.
"""

from __future__ import annotations

from waypost.hookspecs import registering

__version__ = "0.1.0"

from waypost_ga4.sink import Ga4Config, Ga4Sink, app_instance_id

__all__ = ["Ga4Config", "Ga4Sink", "__version__", "app_instance_id", "register_sinks"]


register_sinks = registering(Ga4Sink)

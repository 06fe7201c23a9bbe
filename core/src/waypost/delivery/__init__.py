"""Delivery: the pipeline from the buffer to the sinks (:mod:`.pipeline`), each sink's runner
(:mod:`.runner`) inside its error boundary (:mod:`.boundary`), the SQLite outbox that loses
nothing (:mod:`.outbox`) and the retry delay (:mod:`.backoff`).

Nothing is imported here, so that ``waypost.retry`` can re-export :class:`.backoff.Backoff`
without loading the pipeline.
"""

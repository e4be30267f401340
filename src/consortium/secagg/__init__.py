"""consortium.secagg: secure aggregation (SecAgg+, Bell et al. 2020) for Flower's Message API.

The coordinator learns only sums of the institutions' clipped, weighted model
updates, weights and training metrics. Entry points:

* :func:`consortium.secagg.flower.secagg_mod` - the institution's ClientApp mod;
* :func:`consortium.secagg.flower.run_secure_round` - one round on the coordinator;
* :class:`consortium.secagg.config.SecAggConfig` - the parameters.

See ``docs/secagg.md`` for the protocol, the threat model and parameter choice.
"""

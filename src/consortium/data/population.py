"""Customers and terminals of one simulated institution.

Following the handbook simulator, customers and terminals live on a 100 x 100
grid; each customer has a mean and spread of amounts and a relative activity,
and pays only at terminals within a radius of home.  The neighbourhoods are
found once with a k-d tree and stored as a dense ``(customers, K)`` table so that
picking a terminal for a million transactions is one vectorised lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

GRID_SIZE = 100.0
MAX_NEAR_TERMINALS = 32
"""At most this many of the nearest terminals form a customer's neighbourhood."""
MEAN_AMOUNT_RANGE = (5.0, 100.0)
"""Customers' mean amounts are uniform in this range (times the spending scale)."""


@dataclass(frozen=True, eq=False)
class Population:
    """Customer profiles and terminal neighbourhoods.

    Attributes
    ----------
    mean_amount, std_amount : numpy.ndarray
        Per-customer mean and standard deviation of legitimate amounts.
    activity : numpy.ndarray
        Per-customer probability of being the payer of a legitimate transaction
        (sums to 1).
    near_terminals : numpy.ndarray
        ``(n_customers, K)`` ids of each customer's nearest terminals, nearest first.
    n_near : numpy.ndarray
        How many of those lie within the radius (at least 1: the nearest one).
    n_terminals : int
        Number of terminals of the institution.
    """

    mean_amount: np.ndarray
    std_amount: np.ndarray
    activity: np.ndarray
    near_terminals: np.ndarray
    n_near: np.ndarray
    n_terminals: int

    @property
    def n_customers(self) -> int:
        """Number of customers."""
        return int(self.mean_amount.shape[0])

    def home_terminals(self, customers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniformly chosen terminal in each customer's neighbourhood."""
        pick = np.floor(rng.random(customers.size) * self.n_near[customers]).astype(np.int64)
        return self.near_terminals[customers, pick]


def make_population(
    *,
    n_customers: int,
    n_terminals: int,
    spending_scale: float,
    activity_dispersion: float,
    terminal_radius: float,
    rng: np.random.Generator,
) -> Population:
    """Draw customers, terminals and neighbourhoods.

    Parameters
    ----------
    n_customers, n_terminals : int
        Population sizes.
    spending_scale : float
        Multiplier of every customer's mean amount (rich vs. modest customer base).
    activity_dispersion : float
        Sigma of the log-normal relative activity of customers (0 = all equal).
    terminal_radius : float
        Customers pay at terminals within this distance of home (grid is 100 wide).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    Population
        The drawn population.
    """
    cust_xy = rng.uniform(0.0, GRID_SIZE, size=(n_customers, 2))
    mean_amount = rng.uniform(*MEAN_AMOUNT_RANGE, size=n_customers) * spending_scale
    std_amount = mean_amount / 2.0
    activity = rng.lognormal(0.0, activity_dispersion, size=n_customers)
    activity /= activity.sum()
    term_xy = rng.uniform(0.0, GRID_SIZE, size=(n_terminals, 2))
    k = min(MAX_NEAR_TERMINALS, n_terminals)
    dist, idx = cKDTree(term_xy).query(cust_xy, k=k)
    dist = np.asarray(dist).reshape(n_customers, k)
    idx = np.asarray(idx, dtype=np.int64).reshape(n_customers, k)
    n_near = np.clip((dist <= terminal_radius).sum(axis=1), 1, k).astype(np.int64)
    return Population(
        mean_amount=mean_amount,
        std_amount=std_amount,
        activity=activity,
        near_terminals=idx,
        n_near=n_near,
        n_terminals=n_terminals,
    )

"""Analysis parameters of PTC01 / PTC02 (the pair measurement and the fits)."""

from __future__ import annotations

from pydantic import BaseModel, Field

TESTS = ("PTC01", "PTC02")
ADC_MAX = 65535.0  # highest code of the 16-bit ADC (raw ADU)
FULL_SCALE = 65536.0


class PTCParams(BaseModel):
    """Analysis parameters of PTC01/02. The extraction uses the measurement ones (``edge``,
    ``offset_method``, ``*_nsigma``, ``max_lag``, ``ks_bins``); every threshold of a rejection
    or a fit applies in the solve, so that changing one re-solves without re-measuring."""

    offset_method: str = Field("mean", description="offset subtraction: mean (clipped mean of the trimmed prescan) | global (its median) | row")
    edge: int = Field(5, ge=0, description="pixels dropped at every edge of the image area")
    mean_nsigma: float = Field(5.0, description="clipping of the preliminary frame means (weights of the symmetric difference)")
    diff_nsigma: float = Field(5.0, description="clipping of the difference image: the one pixel mask of means, variance and covariances")
    max_lag: int = Field(8, ge=0, le=32, description="largest covariance lag measured")
    fit_lag: int = Field(8, ge=0, le=32, description="largest lag in the full covariance fit (<= max_lag)")
    use_defect_mask: bool = Field(True, description="exclude the cosmetic defect mask (COSMETICS00) when it is available at extraction")
    max_mismatch: float = Field(0.10, description="reject pairs whose fluences differ by more than this fraction")
    ks_pmin: float = Field(0.01, description="reject pairs whose difference image fails the KS normality test below this p")
    ks_bins: int = Field(100, ge=20, description="bins of the histogram (+/- 8 sigma) the KS reference Gaussian is fitted to")
    max_sat_frac: float = Field(1e-4, description="pairs with a larger fraction of saturated pixels (ADC 65535 or a full-well "
                                "plateau) are measured but not fitted")
    outlier_nsigma: float = Field(5.0, description="iterative outlier rejection of the PTC fits")
    turnoff_rel_drop: float = Field(0.005, description="relative drop of the binned variance that marks the turnoff")
    bloom_rel_drop: float = Field(0.02, description="relative variance deficit vs the model that marks blooming")
    bloom_nsigma: float = Field(5.0, description="... and its significance")
    bloom_consecutive: int = Field(2, ge=1, description="consecutive fluence groups below the model")
    her_range: tuple[float, float] = Field((0.2, 0.8), description="fluence range (fraction of 2^16 ADU) of frames used for HER")
    her_max: float = Field(1.5e-3, description="flag |HER| above this (hard-edge response, fraction)")
    ron_tolerance: float = Field(0.05, description="PTC noise vs overscan RON: flag beyond this relative difference when also "
                                 "beyond ron_nsigma errors of the PTC noise")
    ron_nsigma: float = Field(3.0, description="significance of a PTC noise vs overscan RON difference that is flagged")
    full_fit: bool = Field(True, description="run the full covariance (Astier eq. 20) fit")
    fit_b: bool = Field(True, description="fit the b matrix in the full model (else b = 0)")
    a_min_for_b: float = Field(1e-9, description="b = c / a only where |a| exceeds this (1/e-); NaN elsewhere")
    seed: int = Field(12345, description="seed of the dither that removes ADU quantisation before the KS test")

"""Errors as values with stable codes. The gateway maps them to HTTP once (problem+json)."""

from __future__ import annotations

# code -> HTTP status. A code is part of the API contract: never rename one, add new ones.
ERROR_STATUS: dict[str, int] = {
    "empty_file": 400,
    "unsupported_media_type": 415,
    "image_unreadable": 422,
    "dicom_unreadable": 422,
    "dicom_no_pixel_data": 422,
    "dicom_multiframe": 422,
    "dicom_truncated": 422,
    "dicom_burned_in_annotation": 422,
    "dicom_unsupported_transfer_syntax": 415,
    "dicom_unsupported_photometric": 415,
    "dicom_required": 415,
    "dicom_sop_class_not_supported": 415,
    "dicom_missing_study_uid": 422,
    "dicom_missing_uid": 422,
    "dicom_invalid_uid": 422,
    "dicom_invalid_attribute": 422,
    "dicom_sop_class_mismatch": 422,
    "dicom_invalid_lut": 422,
    "dicom_dimension_mismatch": 422,
    "multipart_unreadable": 400,
    "image_too_large": 413,
    "image_too_small": 422,
    "file_too_large": 413,
    "request_too_large": 413,
    "missing_file": 400,
    "too_many_files": 413,
    "archive_unreadable": 422,
    "archive_unsafe_path": 422,
    "archive_too_large": 413,
    "archive_empty": 422,
    "nested_archive": 422,
    "invalid_request": 422,
    "invalid_parameter": 422,
    "idempotency_key_conflict": 409,
    "unauthorized": 401,
    "forbidden": 403,
    "too_many_failed_authentications": 429,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "host_not_allowed": 421,
    "cross_site_request": 403,
    "session_expired": 401,
    "csrf_token_invalid": 403,
    "api_key_not_found": 404,
    "job_not_found": 404,
    "job_not_cancellable": 409,
    # Explanations (GET/POST /v1/jobs/{id}/explanation).
    "job_not_succeeded": 409,  # a failed or cancelled job has no answer to explain
    "explanation_not_requested": 404,
    "explanation_unavailable": 422,  # the version's card names no layer Grad-CAM can use
    "explanation_failed": 409,  # anything else (storage, the input gone): POST again to try again
    "batch_not_found": 404,
    "report_not_ready": 409,
    "report_not_available": 404,
    "invalid_callback": 422,
    "callback_destination_refused": 422,  # SSRF policy: the same answer whatever the reason
    "callback_secret_not_configured": 404,
    "model_not_found": 404,
    "model_not_owned": 403,  # registering into, promoting or rolling back another organisation's or a shared model
    "dataset_not_found": 404,
    "dataset_invalid": 422,
    "dataset_empty": 422,
    "dataset_too_few_classes": 422,
    "dataset_mixed_layout": 422,
    "dataset_invalid_layout": 422,
    "dataset_invalid_class_name": 422,
    "dataset_split_mismatch": 422,
    "dataset_unreadable_files": 422,
    "dataset_label_conflict": 409,
    "dataset_corrupt": 500,
    "run_not_found": 404,
    "run_not_cancellable": 409,
    "base_model_mismatch": 422,
    "model_name_mismatch": 422,
    "no_previous_version": 409,
    "model_corrupt": 500,
    "unknown_architecture": 422,
    "invalid_model_name": 422,
    "invalid_classes": 422,
    # Importing weights (POST /v1/models/{name}/import).
    "weights_pickled": 415,  # a pickle or ZIP (torch.save): never unpickled
    "weights_unreadable": 422,
    "weights_sha256_mismatch": 422,
    "weights_mismatch": 422,  # tensor names, shapes or kinds that do not fit the architecture
    "weights_not_finite": 422,
    "no_active_model": 409,
    "sr_destination_not_found": 404,
    "sr_destination_exists": 409,
    "not_found": 404,
    "method_not_allowed": 405,
    # Failures recorded on a job (not HTTP responses of their own).
    "inference_failed": 500,
    "input_missing": 500,
    "input_unavailable": 500,
    "input_corrupted": 500,  # the stored input's sha256 differs from the one computed at intake
    "preprocess_failed": 500,
    "result_unwritable": 500,
    "too_many_attempts": 500,
    # Failures recorded on a training run.
    "trainer_lost": 500,
    "training_failed": 500,
    # Failures recorded on a batch: its result could not be made (no report), or not sent.
    "report_failed": 500,
    "delivery_failed": 502,  # a result that could not be sent (C-STORE, callback); retried
    "internal_error": 500,
    # Backup and restore (`xrayq backup`, `xrayq restore`: the command line, no HTTP route).
    "backup_destination_exists": 409,
    "backup_invalid": 422,  # not a backup xrayq wrote (no manifest, a file missing, a bad name)
    "backup_corrupt": 422,  # a file whose size or sha256 differs from the manifest's
    "backup_mode_mismatch": 422,  # a SQLite backup into Postgres, or the reverse
    "backup_newer_than_code": 409,
    "backup_target_not_empty": 409,
    "backup_tool_unavailable": 500,  # pg_dump/pg_restore missing, or older than the server
    "backup_failed": 500,
}


class XrayqError(Exception):
    """A failure with a stable machine-readable code and a human sentence."""

    def __init__(self, code: str, detail: str, **extra: object) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.extra = extra

    @property
    def http_status(self) -> int:
        return ERROR_STATUS.get(self.code, 400)

-- Device binding of refresh families: the SHA-256 of the device id a family was opened
-- for (32 bytes; never the id itself). A refresh presenting another device revokes the
-- family. NULL is a family that is not bound: every family from before this column, and
-- those opened without a device id, which accept a refresh from any device.
ALTER TABLE refresh_families ADD COLUMN device_fingerprint BYTEA;

-- Every row is NULL yet, so there is nothing to validate: NOT VALID skips the scan
-- (and the long lock it would need), and the check still holds for every new row.
ALTER TABLE refresh_families
    ADD CONSTRAINT refresh_families_device_fingerprint_len
    CHECK (device_fingerprint IS NULL OR octet_length(device_fingerprint) = 32) NOT VALID;

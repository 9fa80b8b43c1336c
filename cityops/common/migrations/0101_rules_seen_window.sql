-- Rules de-duplicates on the seqs it saw, not on order (issue 12.3): besides the highest seq
-- acted on, rule_state keeps a bitmap of the 256 seqs below it (bit i = seq last_seq - 1 - i
-- seen, 32 bytes big-endian), so a late reading never seen is evaluated and a repeat is not.
-- NULL: a row written before this migration, when every seq below last_seq counted as seen;
-- it is read as a full window, which keeps that meaning until the device's next write.
ALTER TABLE rule_state ADD COLUMN seen_below bytea;

-- api (issue 5): leave room in the pages of the rows the projector rewrites on every reading,
-- so updates stay on their page (HOT: no index entry per update, less vacuum work).
ALTER TABLE device_state SET (fillfactor = 70);
ALTER TABLE device_connectivity SET (fillfactor = 70);

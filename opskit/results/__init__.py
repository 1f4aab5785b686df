"""Results: read pulled runs under results/raw/, aggregate seeds, gate phases, draw figures, import
earlier studies, fit scaling laws, publish to git. Reads only local artifacts and the store."""

mod delivery;
mod faults;
mod large_transaction;
mod startup_errors;

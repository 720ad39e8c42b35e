//! The injection decision and mutation (webhook side). See DESIGN.md "The decision".
